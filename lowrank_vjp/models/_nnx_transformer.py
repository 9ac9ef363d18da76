"""The pre-LN transformer block shared by the NNX GPT and ViT.

The NNX twin of :mod:`lowrank_vjp.models._transformer`, module for module:
``ln_1``, ``attn/c_attn``, ``attn/c_proj``, ``ln_2``, ``mlp/c_fc``,
``mlp/c_proj`` (nanoGPT's names), with Linen's parameter names and shapes,
so Linen variables load with
:func:`lowrank_vjp.models.nnx.load_linen_variables`. The dense layers are
``nnx.Linear`` (initialised with :data:`INIT`), whose ``dot_general``
:func:`lowrank_vjp.nnx.apply` can replace. The neighbours are the Linen
model's :class:`~lowrank_vjp.models._transformer.Choices` (the same
attention and GELU functions); the library's LayerNorm is :class:`LayerNorm`
here, which records its statistics for :func:`lowrank_vjp.nnx.stats`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_vjp._src.control import scope
from lowrank_vjp._src.layers import batchnorm_train, layernorm
from lowrank_vjp._src.methods import base as methods_base
from lowrank_vjp._src.nnx import variables
from lowrank_vjp.models import _transformer

INIT = _transformer.INIT
"""Weight initialiser of the dense layers and embeddings (GPT-2's)."""

EPSILON = 1e-5
"""The LayerNorms' epsilon (Linen's blocks use the same)."""


class LayerNorm(nnx.Module):
  """``nnx.LayerNorm`` whose backward keeps a method's residual of ``x̂``.

  The NNX twin of :class:`lowrank_vjp.flax.LayerNorm` (over the last axis,
  with ``scale`` and ``bias``, ``[C]``, as Linen's): the forward is exact,
  the backward keeps what :attr:`method` keeps of ``x̂`` (None: the input
  itself, exact). Each call stores the residual's
  :class:`lowrank_vjp.CompressionStats` in :attr:`lowrank_stats`, which
  :func:`lowrank_vjp.nnx.stats` reports under this module's path.

  Args:
    num_features: ``C``, the size of the last axis.
    epsilon: Added to the variance, ``> 0``.
    method: :data:`lowrank_vjp._src.layers.layernorm.DEFAULT_METHOD` (8-bit
      codes per feature), None (exact), or another stateless method or
      shorthand.
    path: The layer's path (``"h_0/ln_1"``): the key
      :func:`lowrank_vjp.rank_capacities` sets a capacity under, for a
      method with ranks.
    rngs: Unused (the parameters start at ones and zeros); accepted like
      every NNX layer's.

  Example::

    norm = LayerNorm(64, path="ln_f", rngs=nnx.Rngs(0))
    y = norm(x)                       # [..., 64]
    lowrank_vjp.nnx.stats(norm)       # {"": CompressionStats}
  """

  def __init__(self, num_features: int, *, epsilon: float = EPSILON,
               method: Any = layernorm.DEFAULT_METHOD, path: str = "",
               rngs: nnx.Rngs | None = None):
    del rngs
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.epsilon = epsilon
    self.method = nnx.static(methods_base.resolve_stateless(
        method, "lowrank_vjp.models.nnx LayerNorm"))
    self.path = path
    self.lowrank_stats = variables.Compression(None)

  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    """Normalises each token of ``x`` ``[..., C]`` over its features."""
    x = jnp.asarray(x)
    method = self.method
    if method is not None:
      method = scope.configured(method, self.path)
    y, _, _, stats = batchnorm_train.normalization_with_stats(
        "LayerNorm", x, self.scale[...], self.bias[...], axis=x.ndim - 1,
        reduce=-1, use_mean=True, epsilon=self.epsilon, method=method)
    self.lowrank_stats.set_value(stats)
    return y


def choices(owner: str, *, attention: str, norm_method: Any,
            activation: str, attention_method: Any, remat: str | None,
            scan: bool, causal: bool) -> _transformer.Choices:
  """The checked :class:`~lowrank_vjp.models._transformer.Choices`.

  Raises:
    ValueError: naming the field, for an unknown ``attention`` or
      ``activation``, or for ``remat`` / ``scan`` set (the NNX models run
      their blocks one by one, without ``nn.remat`` or ``nn.scan``).
  """
  if remat is not None:
    raise ValueError(f"lowrank_vjp.models.nnx.{owner}: remat must be None "
                     f"(the NNX model has no rematerialised blocks; use the "
                     f"Linen lowrank_vjp.models.{owner}); got {remat!r}.")
  if scan is not False:
    raise ValueError(f"lowrank_vjp.models.nnx.{owner}: scan must be False "
                     f"(the NNX model has no scanned blocks; use the Linen "
                     f"lowrank_vjp.models.{owner}); got {scan!r}.")
  out = _transformer.Choices(attention, norm_method, activation,
                             attention_method, causal)
  out.check(f"lowrank_vjp.models.nnx.{owner}")
  return out


def norm(c: _transformer.Choices, num_features: int, path: str, *,
         rngs: nnx.Rngs) -> nnx.Module:
  """``nnx.LayerNorm`` for ``norm_method="flax"``, else :class:`LayerNorm`.
  """
  if isinstance(c.norm_method, str) and c.norm_method == "flax":
    return nnx.LayerNorm(num_features, epsilon=EPSILON, rngs=rngs)
  return LayerNorm(num_features, method=c.norm_method, path=path, rngs=rngs)


def dense(in_features: int, out_features: int, *,
          rngs: nnx.Rngs) -> nnx.Linear:
  """A block's ``nnx.Linear``, initialised as Linen's (:data:`INIT`)."""
  return nnx.Linear(in_features, out_features, kernel_init=INIT, rngs=rngs)


def _join(prefix: str, name: str) -> str:
  return f"{prefix}/{name}" if prefix else name


class _Attention(nnx.Module):
  """``attn``: ``c_attn`` (``[C, 3C]``), the attention, ``c_proj``."""

  def __init__(self, n_embd: int, n_head: int, c: _transformer.Choices, *,
               rngs: nnx.Rngs):
    self.c_attn = dense(n_embd, 3 * n_embd, rngs=rngs)
    self.c_proj = dense(n_embd, n_embd, rngs=rngs)
    self.n_head = n_head
    self.choices = nnx.static(c)

  def __call__(self, x):
    b, t, c = x.shape
    qkv = self.c_attn(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, self.n_head, c // self.n_head),
                        3, axis=2)
    y = self.choices.attend(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    return self.c_proj(y.reshape(b, t, c))


class _Mlp(nnx.Module):
  """``mlp``: ``c_fc`` (``[C, ratio·C]``), GELU, ``c_proj``."""

  def __init__(self, n_embd: int, c: _transformer.Choices, ratio: int, *,
               rngs: nnx.Rngs):
    self.c_fc = dense(n_embd, ratio * n_embd, rngs=rngs)
    self.c_proj = dense(ratio * n_embd, n_embd, rngs=rngs)
    self.choices = nnx.static(c)

  def __call__(self, x):
    return self.c_proj(self.choices.gelu(self.c_fc(x)))


class Block(nnx.Module):
  """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` (NNX).

  Args:
    n_embd: Width ``C`` of the ``[B, T, C]`` tokens.
    n_head: Attention heads (``C`` a multiple of them).
    c: The neighbours (:func:`choices`).
    mlp_ratio: MLP hidden width over ``C``.
    path: This block's path in the model (``"h_0"``), for the LayerNorms'
      rank capacities.
    rngs: Initialisation keys.
  """

  def __init__(self, n_embd: int, n_head: int, c: _transformer.Choices,
               mlp_ratio: int = 4, *, path: str = "", rngs: nnx.Rngs):
    self.ln_1 = norm(c, n_embd, _join(path, "ln_1"), rngs=rngs)
    self.attn = _Attention(n_embd, n_head, c, rngs=rngs)
    self.ln_2 = norm(c, n_embd, _join(path, "ln_2"), rngs=rngs)
    self.mlp = _Mlp(n_embd, c, mlp_ratio, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))
