"""Pytrees saved between the forward and the backward pass, and their stats."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


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
    core: ``[K_0, …, K_{n-1}]``, in the activation's dtype.
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressionStats:
  """What one compressed layer kept on one step.

  Arrays (traced, one entry per axis of the activation):
    needed_ranks: ``int32[n]``, the fewest components reaching ε per mode
      (the axis size for uncompressed axes).
    kept_ranks: ``int32[n]``, components actually kept:
      ``min(needed_ranks, capacity)``.
    kept_energy: ``float32[n]``, explained variance of the kept components
      (1.0 for uncompressed axes and for an all-zero activation).
    overflow: ``bool[]``, True when some mode needed more than its capacity,
      so less than ε was kept.

  Static fields (Python values):
    shape: The activation's shape.
    capacity: Static rank capacity per axis (None = uncompressed).
    method: The compression method.
    itemsize: Bytes per element of the activation.
    residual_nbytes: Bytes the saved residual occupies (capacity-sized).
  """

  needed_ranks: jax.Array
  kept_ranks: jax.Array
  kept_energy: jax.Array
  overflow: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  capacity: tuple[int | None, ...] = dataclasses.field(
      metadata=dict(static=True))
  method: str = dataclasses.field(metadata=dict(static=True))
  itemsize: int = dataclasses.field(metadata=dict(static=True))
  residual_nbytes: int = dataclasses.field(metadata=dict(static=True))

  @property
  def activation_nbytes(self) -> int:
    """Bytes of the uncompressed activation (what vanilla backprop saves)."""
    return math.prod(self.shape) * self.itemsize

  def analytic_nbytes(self) -> int:
    """The paper's count at the ranks ε needed: ``(Π K + Σ I·K) · itemsize``.

    Uses ``needed_ranks`` (not the capacity), so it is the memory an ideal
    dynamic-shape implementation would hold. Needs concrete (not traced)
    statistics. A layer without ranks (vanilla, gradient filter, K-bit
    codes, checkpointing) saves a residual whose size the shape fixes: its
    count is ``residual_nbytes``.
    """
    if all(c is None for c in self.capacity):
      return self.residual_nbytes
    ranks = np.asarray(jax.device_get(self.needed_ranks)).reshape(
        -1, len(self.shape))
    counts = []
    for row in ranks:
      n = math.prod(int(k) for k in row)
      n += sum(i * int(k) for i, k, cap in zip(self.shape, row, self.capacity)
               if cap is not None)
      counts.append(n * self.itemsize)
    return int(max(counts))


def _never(words) -> jax.Array:
  """A predicate XLA cannot prove false that is never true.

  A 32-bit word has at most 32 set bits.
  """
  bits = sum(jax.lax.population_count(w) for w in words)
  return bits > 32 * len(words)


def _word(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def tie(y: jax.Array, res) -> jax.Array:
  """Returns ``y`` unchanged, made to depend on every array of ``res``.

  XLA schedules a residual's computation wherever it likes before its first
  use, which is in the backward pass; it was seen postponing the last
  contractions of a Tucker core there and keeping a larger intermediate (or
  the input itself) alive in its place. ``lax.optimization_barrier`` does not
  prevent this on the CPU, whose pipeline removes barriers early. Here ``y``
  passes through a select whose predicate reads a reduction of every
  residual array and is never true, so the residual must exist before ``y``
  is used, and ``y``'s values, NaNs included, are untouched.

  Args:
    y: The primal output.
    res: A pytree of arrays to compute no later than ``y``.

  Returns:
    ``y``, same values.
  """
  leaves = [l for l in jax.tree_util.tree_leaves(res) if l.size]
  if not leaves:
    return y
  never = _never([_word(jnp.max(l)) for l in leaves])
  return jnp.where(never, jnp.zeros_like(y), y)


def after(x: jax.Array, g: jax.Array) -> jax.Array:
  """Returns ``x`` unchanged, made to depend on the cotangent ``g``.

  Work in a backward rule that reads only residuals (rebuilding part of an
  activation, flipping a kernel) can otherwise be hoisted by XLA into the
  forward pass, where its larger result is then kept alive until the backward
  pass. One element of ``g`` is enough to pin it after ``g`` exists.

  Args:
    x: Array computed from residuals only.
    g: The incoming cotangent.

  Returns:
    ``x``, same values.
  """
  if not g.size:
    return x
  first = jax.lax.slice(g.reshape(-1), (0,), (1,))[0]
  return jnp.where(_never([_word(first)]), jnp.zeros_like(x), x)


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
