"""The Tucker residual: a compressed activation as a core and factors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TuckerResidual:
  """A Tucker-compressed activation: ``x ≈ core ×₀ U₀ ×₁ U₁ … ×ₙ Uₙ``.

  Axis ``a`` of ``core`` has size ``K_a`` where ``factors[a]`` has shape
  ``[I_a, K_a]``, and size ``I_a`` (the activation's own) where
  ``factors[a] is None`` (that mode is not compressed). HOSVD-ε sets every
  factor; the batch-mode SVD sets only the batch axis's factor, so
  ``core = U_Bᵀ x`` holds ``Σ V_ᵀ`` and the factor holds ``U``.

  Columns of a factor beyond the rank that ε needs are zero (ε-masking), so
  the rebuilt activation is exactly the ε-truncated HOSVD while the arrays
  keep their static capacity shape.

  Saved bytes: ``itemsize(core) · Π_a K_a + itemsize(U) · Σ_a I_a K_a`` with
  ``K_a = I_a`` for uncompressed axes (which contribute no factor).

  Attributes:
    core: ``[K_0, …, K_{n-1}]``, in the activation's dtype (float32 for a
      float16 activation, whose range a core can exceed: :func:`core_dtype`).
    factors: One ``[I_a, K_a]`` array (float32, or float64 under x64) or None
      per axis of the activation.
  """

  core: jax.Array
  factors: tuple[jax.Array | None, ...]

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the activation this residual stands for."""
    return tuple(c if f is None else f.shape[0]
                 for c, f in zip(self.core.shape, self.factors))

  @property
  def nbytes(self) -> int:
    """Bytes held by the core and the factors (static)."""
    total = math.prod(self.core.shape) * jnp.dtype(self.core.dtype).itemsize
    for f in self.factors:
      if f is not None:
        total += math.prod(f.shape) * jnp.dtype(f.dtype).itemsize
    return total

  def reconstruct(self, dtype=None) -> jax.Array:
    """Rebuilds the full activation ``core ×ₐ Uₐ`` (for references and tests).

    Args:
      dtype: Output dtype; the factors' dtype when None.

    Returns:
      An array of shape :attr:`shape`.
    """
    x = self.core
    for axis, factor in enumerate(self.factors):
      if factor is None:
        continue
      x = jnp.moveaxis(
          jnp.tensordot(x.astype(factor.dtype), factor, axes=([axis], [1]),
                        precision=jax.lax.Precision.HIGHEST), -1, axis)
    return x.astype(dtype or x.dtype)


def core_dtype(dtype) -> jnp.dtype:
  """The dtype a Tucker core of an activation of ``dtype`` is kept in.

  The activation's own, unless its range is narrower than float32's
  (float16: 65504), where a core — whose entries reach the activation's
  Frobenius norm — could overflow: then float32.
  """
  dtype = jnp.dtype(dtype)
  if jnp.finfo(dtype).maxexp < jnp.finfo(jnp.float32).maxexp:
    return jnp.dtype(jnp.float32)
  return dtype


def tucker_nbytes(shape, ranks, core_itemsize: int,
                  factor_itemsize: int) -> int:
  """Bytes of a Tucker residual with the given per-axis ranks.

  Args:
    shape: Activation shape ``[I_0, …]``.
    ranks: ``K_a`` per axis, or None for an uncompressed axis.
    core_itemsize: Bytes per core element.
    factor_itemsize: Bytes per factor element.

  Returns:
    ``core_itemsize · Π K + factor_itemsize · Σ I·K`` (``K = I`` where None).
  """
  core = math.prod(i if k is None else k for i, k in zip(shape, ranks))
  factors = sum(i * k for i, k in zip(shape, ranks) if k is not None)
  return core * core_itemsize + factors * factor_itemsize
