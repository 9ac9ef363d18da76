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

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowrank_vjp.models import _transformer


class GPT(_transformer.Neighbours):
  """nanoGPT's decoder: token and position embeddings, pre-LN blocks, tied
  output head.

  Attributes:
    vocab_size: Tokens.
    block_size: Longest sequence.
    n_layer, n_head, n_embd: Depth, heads, width.
    attention, norm_method, activation, attention_method, remat, scan: Which
      neighbours the blocks run, and whether as one ``nn.scan`` (paths
      ``h/...``) (:class:`_transformer.Neighbours`; see the module
      docstring).

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

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """``[B, T]`` int tokens to ``[B, T, vocab_size]`` logits.

    ``train`` is accepted for the training loop's sake and changes nothing
    (no dropout).
    """
    del train
    choices = self.choices(causal=True)
    if self.n_embd % self.n_head:
      raise ValueError(f"GPT: n_embd ({self.n_embd}) must be a multiple of "
                       f"n_head ({self.n_head}).")
    b, t = tokens.shape
    if t > self.block_size:
      raise ValueError(f"GPT: sequence of {t} tokens is longer than "
                       f"block_size={self.block_size}.")
    wte = nn.Embed(self.vocab_size, self.n_embd,
                   embedding_init=_transformer.INIT, name="wte")
    pos = nn.Embed(self.block_size, self.n_embd,
                   embedding_init=_transformer.INIT, name="wpe")(jnp.arange(t))
    x = wte(tokens) + pos[None]
    x = self.run_blocks(x, self.n_layer, "h", self.n_head, choices)
    x = choices.norm("ln_f")(x)
    return wte.attend(x)
