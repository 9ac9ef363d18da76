"""Low-rank updates for fine-tuning: a frozen kernel plus a trained delta.

Fine-tuning adapters in the weight-delta sense (not Flax modules): a
pretrained kernel ``W₀`` stays fixed and only a low-rank correction ``ΔW`` is
trained.

- :class:`TuckerAdapter`: ``W = W₀ + ΔW`` with ``ΔW`` a :class:`TuckerWeight`
  (all kernel modes factorized), trained by TDLRT so that its rank adapts.
- :class:`LoRAWeight`: the matrix LoRA baseline, ``W = W₀ + s · reshape(A B)``
  with ``A`` ``[KH·KW·I, r]`` and ``B`` ``[r, O]``, trained directly.

Both are pytrees that :func:`materialize` turns into the full kernel, so the
pretrained model's code does not change. ``W₀`` sits behind
``lax.stop_gradient``; freeze it in the optimizer too (its gradient is zero,
but weight decay would still move it), e.g. with ``optax.multi_transform``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from lowrank_vjp._src.tdlrt import weight as tw


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TuckerAdapter(tw.StructuredKernel):
  """``W = stop_gradient(base) + delta.kernel()``.

  Saved bytes: those of ``base`` plus ``delta.nbytes``; trainable parameters:
  ``delta``'s (``Π r_i + Σ n_i r_i`` at its active ranks).

  Attributes:
    base: The frozen pretrained kernel ``[*shape]``.
    delta: The :class:`TuckerWeight` correction of the same shape.
  """

  base: jax.Array
  delta: tw.TuckerWeight

  def kernel(self, dtype=None) -> jax.Array:
    """The adapted kernel ``[*shape]``."""
    dtype = dtype or self.base.dtype
    return (lax.stop_gradient(self.base).astype(dtype)
            + self.delta.kernel(dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAWeight(tw.StructuredKernel):
  """``W = stop_gradient(base) + scale · reshape(a @ b, base.shape)``.

  Trainable parameters: ``r · (Π shape[:-1] + shape[-1])``.

  Attributes:
    base: The frozen pretrained kernel ``[*shape]``, ``shape[-1] = O``.
    a: ``[Π shape[:-1], r]``.
    b: ``[r, O]`` (zero at initialisation, so training starts at ``base``).
    scale: Static multiplier (``alpha / r`` in the LoRA paper).
  """

  base: jax.Array
  a: jax.Array
  b: jax.Array
  scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)

  @property
  def num_params(self) -> int:
    """Trainable parameters ``r · (m + O)``."""
    return math.prod(self.a.shape) + math.prod(self.b.shape)

  def kernel(self, dtype=None) -> jax.Array:
    """The adapted kernel ``[*shape]``."""
    dtype = dtype or self.base.dtype
    delta = jnp.dot(self.a, self.b, precision=lax.Precision.HIGHEST)
    return (lax.stop_gradient(self.base).astype(dtype)
            + (self.scale * delta).reshape(self.base.shape).astype(dtype))


def tucker_adapter(key: jax.Array, base: jax.typing.ArrayLike, ranks=0.5, *,
                   init_ranks=None) -> TuckerAdapter:
  """A Tucker adapter that starts at ``base`` (its correction is zero).

  The correction has random orthonormal factors and a zero core; TDLRT's
  first Galerkin step makes the core non-zero in the directions the gradient
  asks for.

  Args:
    key: PRNG key for the factors.
    base: Pretrained kernel, e.g. ``[KH, KW, I, O]``.
    ranks: Static capacity per kernel mode (see :func:`capacities`).
    init_ranks: Active ranks to start from (capacity when None).

  Returns:
    A :class:`TuckerAdapter`.

  Example::

    params["conv3"]["kernel"] = tucker_adapter(
        jax.random.key(0), params["conv3"]["kernel"], ranks=(3, 3, 8, 8))
  """
  base = jnp.asarray(base)
  delta = tw.random_tucker(key, base.shape, ranks, init_ranks=init_ranks,
                           dtype=base.dtype)
  delta = dataclasses.replace(delta, core=jnp.zeros_like(delta.core))
  return TuckerAdapter(base, delta)


def lora_adapter(key: jax.Array, base: jax.typing.ArrayLike, rank: int, *,
                 alpha: float | None = None) -> LoRAWeight:
  """A matrix LoRA correction of a kernel, reshaped to ``[Π shape[:-1], O]``.

  ``a`` is Gaussian with standard deviation ``1/sqrt(m)`` and ``b`` is zero,
  as in LoRA; ``scale = alpha / rank`` (1 when ``alpha`` is None).

  Args:
    key: PRNG key.
    base: Pretrained kernel.
    rank: LoRA rank ``r``.
    alpha: LoRA's ``alpha``.

  Returns:
    A :class:`LoRAWeight`.
  """
  base = jnp.asarray(base)
  m, o = math.prod(base.shape[:-1]), base.shape[-1]
  a = jax.random.normal(key, (m, rank), base.dtype) / math.sqrt(m)
  b = jnp.zeros((rank, o), base.dtype)
  scale = 1.0 if alpha is None else float(alpha) / rank
  return LoRAWeight(base, a, b, scale=scale)
