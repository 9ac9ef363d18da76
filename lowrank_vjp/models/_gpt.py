"""A GPT-style causal language model in nanoGPT's layout (Linen).

Module paths follow nanoGPT's names (``wte``, ``wpe``, ``h_{i}/ln_1``,
``h_{i}/attn/c_attn``, ``h_{i}/attn/c_proj``, ``h_{i}/ln_2``,
``h_{i}/mlp/c_fc``, ``h_{i}/mlp/c_proj``, ``ln_f``; nanoGPT's ``h.{i}`` is
``h_{i}``), so
:mod:`lowrank_vjp.rules` picks layers by those names, and every dense layer
is a plain ``nn.Dense`` that a rule can give a compressed contraction.

What the neighbours of the dense layers keep is chosen here:

* ``attention="blockwise"`` (default): :func:`lowrank_vjp.dot_product_attention`
  (no ``[T, T]`` array kept); ``"jax"``: ``jax.nn.dot_product_attention``.
* ``norm_method``: what :class:`lowrank_vjp.flax.LayerNorm` keeps of ``x̂``
  (default 8-bit codes; None exact); ``"flax"`` uses ``nn.LayerNorm``.
* ``activation="coded"`` (default): :func:`lowrank_vjp.gelu` (8-bit slope
  codes); ``"jax"``: ``jax.nn.gelu``.

The defaults are the memory-lean model; ``GPT.vanilla(...)`` builds the
same network with Flax's and JAX's own layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowrank_vjp._src import remat as remat_lib
from lowrank_vjp._src.layers import activations
from lowrank_vjp._src.layers import attention as attention_lib
from lowrank_vjp._src.layers import layernorm

_init = nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class _Choices:
  attention: str
  norm_method: Any
  activation: str
  attention_method: Any = None

  def norm(self, name: str) -> nn.Module:
    if isinstance(self.norm_method, str) and self.norm_method == "flax":
      return nn.LayerNorm(epsilon=1e-5, name=name)
    return layernorm.LayerNorm(epsilon=1e-5, method=self.norm_method,
                               name=name)

  def attend(self, q, k, v):
    if self.attention == "jax":
      return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return attention_lib.dot_product_attention(
        q, k, v, is_causal=True, method=self.attention_method)

  def gelu(self, x):
    if self.activation == "jax":
      return jax.nn.gelu(x, approximate=True)
    return activations.gelu(x, approximate=True)


class _Block(nn.Module):
  n_head: int
  choices: _Choices

  @nn.compact
  def __call__(self, x):
    h = self.choices.norm("ln_1")(x)
    x = x + _Attention(self.n_head, self.choices, name="attn")(h)
    h = self.choices.norm("ln_2")(x)
    x = x + _Mlp(self.choices, name="mlp")(h)
    return x


class _Attention(nn.Module):
  n_head: int
  choices: _Choices

  @nn.compact
  def __call__(self, x):
    b, t, c = x.shape
    qkv = nn.Dense(3 * c, kernel_init=_init, name="c_attn")(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, self.n_head, c // self.n_head),
                        3, axis=2)
    y = self.choices.attend(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    return nn.Dense(c, kernel_init=_init, name="c_proj")(y.reshape(b, t, c))


class _Mlp(nn.Module):
  choices: _Choices

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = self.choices.gelu(nn.Dense(4 * c, kernel_init=_init, name="c_fc")(x))
    return nn.Dense(c, kernel_init=_init, name="c_proj")(h)


class GPT(nn.Module):
  """nanoGPT's decoder: token and position embeddings, pre-LN blocks, tied
  output head.

  Attributes:
    vocab_size: Tokens.
    block_size: Longest sequence.
    n_layer, n_head, n_embd: Depth, heads, width.
    attention: ``"blockwise"`` or ``"jax"`` (see the module docstring).
    norm_method: What the LayerNorms keep, or ``"flax"``.
    activation: ``"coded"`` or ``"jax"``.
    attention_method: What the blockwise attention keeps of ``q``, ``k``,
      ``v`` (None: themselves, exact; or a stateless method).
    remat: None; ``"full"``: each block under ``nn.remat`` (its backward
      recomputes everything from the block's input); ``"compressed"``: under
      ``nn.remat`` with :func:`lowrank_vjp.save_compressed_residuals`
      (recomputes all but the library's residuals).

  Example::

    model = lv.models.GPT(vocab_size=256, block_size=128, n_layer=4,
                          n_head=4, n_embd=256)
    logits = model.apply(variables, tokens)       # [B, T, vocab]
  """

  vocab_size: int = 256
  block_size: int = 128
  n_layer: int = 4
  n_head: int = 4
  n_embd: int = 256
  attention: str = "blockwise"
  norm_method: Any = layernorm.DEFAULT_METHOD
  activation: str = "coded"
  remat: str | None = None
  attention_method: Any = None

  @classmethod
  def vanilla(cls, **kwargs) -> GPT:
    """The same network with Flax's and JAX's own layers."""
    return cls(attention="jax", norm_method="flax", activation="jax",
               **kwargs)

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """``[B, T]`` int tokens to ``[B, T, vocab_size]`` logits."""
    if self.attention not in ("blockwise", "jax"):
      raise ValueError(f"GPT: attention must be 'blockwise' or 'jax'; got "
                       f"{self.attention!r}.")
    if self.activation not in ("coded", "jax"):
      raise ValueError(f"GPT: activation must be 'coded' or 'jax'; got "
                       f"{self.activation!r}.")
    if self.n_embd % self.n_head:
      raise ValueError(f"GPT: n_embd ({self.n_embd}) must be a multiple of "
                       f"n_head ({self.n_head}).")
    b, t = tokens.shape
    if t > self.block_size:
      raise ValueError(f"GPT: sequence of {t} tokens is longer than "
                       f"block_size={self.block_size}.")
    choices = _Choices(self.attention, self.norm_method, self.activation,
                       self.attention_method)
    wte = nn.Embed(self.vocab_size, self.n_embd, embedding_init=_init,
                   name="wte")
    pos = nn.Embed(self.block_size, self.n_embd, embedding_init=_init,
                   name="wpe")(jnp.arange(t))
    x = wte(tokens) + pos[None]
    if self.remat not in (None, "full", "compressed"):
      raise ValueError(f"GPT: remat must be None, 'full' or 'compressed'; "
                       f"got {self.remat!r}.")
    block = _Block
    if self.remat == "full":
      block = nn.remat(_Block)
    elif self.remat == "compressed":
      block = nn.remat(_Block, policy=remat_lib.save_compressed_residuals())
    for i in range(self.n_layer):
      x = block(self.n_head, choices, name=f"h_{i}")(x)
    x = choices.norm("ln_f")(x)
    return wte.attend(x)
