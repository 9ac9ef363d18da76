"""The pre-LN transformer block shared by GPT and ViT (Linen).

Module names follow nanoGPT: ``ln_1``, ``attn/c_attn``, ``attn/c_proj``,
``ln_2``, ``mlp/c_fc``, ``mlp/c_proj``. :class:`Choices` says which
neighbours of the dense layers run: the library's (blockwise attention,
LayerNorm codes, coded GELU) or Flax's and JAX's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowrank_vjp._src import remat as remat_lib
from lowrank_vjp._src.layers import activations, layernorm
from lowrank_vjp._src.layers import attention as attention_lib

INIT = nn.initializers.normal(0.02)
"""Weight initialiser of the dense layers and embeddings (GPT-2's)."""


@dataclasses.dataclass(frozen=True)
class Choices:
  """Which attention, LayerNorm and GELU a block runs (hashable)."""

  attention: str
  norm_method: Any
  activation: str
  attention_method: Any = None
  causal: bool = False

  def check(self, owner: str) -> None:
    if self.attention not in ("blockwise", "jax"):
      raise ValueError(f"{owner}: attention must be 'blockwise' or 'jax'; "
                       f"got {self.attention!r}.")
    if self.activation not in ("coded", "jax"):
      raise ValueError(f"{owner}: activation must be 'coded' or 'jax'; got "
                       f"{self.activation!r}.")

  def norm(self, name: str) -> nn.Module:
    if isinstance(self.norm_method, str) and self.norm_method == "flax":
      return nn.LayerNorm(epsilon=1e-5, name=name)
    return layernorm.LayerNorm(epsilon=1e-5, method=self.norm_method,
                               name=name)

  def attend(self, q, k, v):
    if self.attention == "jax":
      return jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
    return attention_lib.dot_product_attention(
        q, k, v, is_causal=self.causal, method=self.attention_method)

  def gelu(self, x):
    if self.activation == "jax":
      return jax.nn.gelu(x, approximate=True)
    return activations.gelu(x, approximate=True)


class Block(nn.Module):
  """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

  n_head: int
  choices: Choices
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x):
    h = self.choices.norm("ln_1")(x)
    x = x + _Attention(self.n_head, self.choices, name="attn")(h)
    h = self.choices.norm("ln_2")(x)
    return x + _Mlp(self.choices, self.mlp_ratio, name="mlp")(h)


class _Attention(nn.Module):
  n_head: int
  choices: Choices

  @nn.compact
  def __call__(self, x):
    b, t, c = x.shape
    qkv = nn.Dense(3 * c, kernel_init=INIT, name="c_attn")(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, self.n_head, c // self.n_head),
                        3, axis=2)
    y = self.choices.attend(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    return nn.Dense(c, kernel_init=INIT, name="c_proj")(y.reshape(b, t, c))


class _Mlp(nn.Module):
  choices: Choices
  ratio: int

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = nn.Dense(self.ratio * c, kernel_init=INIT, name="c_fc")(x)
    return nn.Dense(c, kernel_init=INIT, name="c_proj")(self.choices.gelu(h))


class ScanBlock(Block):
  """:class:`Block` as an ``nn.scan`` body: ``(x, None) -> (block(x), None)``.
  """

  def __call__(self, x, _):  # pylint: disable=arguments-differ
    return super().__call__(x), None


SCAN_AXES = {"params": 0, "compression": 0}
"""``variable_axes`` of a scanned stack: parameters and the statistics that
:mod:`lowrank_vjp.flax` layers sow are stacked along a leading layer axis."""


def block_class(remat: str | None, owner: str, base: type[Block] = Block):
  """``base``, or it under ``nn.remat`` (``"full"``, ``"compressed"``)."""
  if remat is None:
    return base
  if remat == "full":
    return nn.remat(base)
  if remat == "compressed":
    return nn.remat(base, policy=remat_lib.save_compressed_residuals())
  raise ValueError(f"{owner}: remat must be None, 'full' or 'compressed'; "
                   f"got {remat!r}.")


class Neighbours(nn.Module):
  """The fields GPT and ViT share: which neighbours their blocks run.

  Attributes:
    attention: ``"blockwise"`` (:func:`lowrank_vjp.dot_product_attention`)
      or ``"jax"``.
    norm_method: What :class:`lowrank_vjp.flax.LayerNorm` keeps of ``x̂``
      (default 8-bit codes; None exact), or ``"flax"`` for ``nn.LayerNorm``.
    activation: ``"coded"`` (:func:`lowrank_vjp.gelu`) or ``"jax"``.
    attention_method: What the blockwise attention keeps of ``q``, ``k``,
      ``v`` (None: themselves, exact; or a stateless method).
    remat: None; ``"full"``: each block under ``nn.remat`` (its backward
      recomputes everything from the block's input); ``"compressed"``: under
      ``nn.remat`` with :func:`lowrank_vjp.save_compressed_residuals`.
    scan: Run the blocks as one ``nn.scan`` (one compiled block, parameters
      stacked along a leading axis, module paths ``h/attn/c_attn`` instead
      of ``h_0/attn/c_attn``; the layers' statistics are stacked the same
      way, :data:`SCAN_AXES`, and a rank controller reads their maximum).
  """

  attention: str = "blockwise"
  norm_method: Any = layernorm.DEFAULT_METHOD
  activation: str = "coded"
  attention_method: Any = None
  remat: str | None = None
  scan: bool = False

  @classmethod
  def vanilla(cls, **kwargs):
    """The same network with Flax's and JAX's own layers."""
    return cls(attention="jax", norm_method="flax", activation="jax",
               **kwargs)

  def choices(self, *, causal: bool) -> Choices:
    """The checked :class:`Choices` of these fields."""
    choices = Choices(self.attention, self.norm_method, self.activation,
                      self.attention_method, causal)
    choices.check(type(self).__name__)
    return choices

  def run_blocks(self, x, n: int, name: str, *args):
    """``n`` blocks ``Block(*args)`` on ``x``: modules ``{name}_{i}``, or one
    ``nn.scan`` named ``name`` when :attr:`scan` is set."""
    owner = type(self).__name__
    if not self.scan:
      block = block_class(self.remat, owner)
      for i in range(n):
        x = block(*args, name=f"{name}_{i}")(x)
      return x
    stack = nn.scan(block_class(self.remat, owner, ScanBlock),
                    variable_axes=SCAN_AXES, split_rngs={"params": True},
                    length=n)
    x, _ = stack(*args, name=name)(x, None)
    return x
