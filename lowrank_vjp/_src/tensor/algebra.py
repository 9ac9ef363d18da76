"""Tucker algebra: unfoldings, mode products, masks, polar and HOSVD bases.

The generic tensor operations that the Tucker-factorized weights (TDLRT) are
built from, in TensorLy's vocabulary (``core``, ``factors``, ``ranks``,
``mode``, ``unfold``). Nothing here knows about kernels, layers or training;
every function is pure and jittable, and shapes depend only on static sizes.

Masking convention: a factor ``[n, R]`` of *capacity* ``R`` holds an *active*
rank ``r ≤ R`` as its first ``r`` columns; columns past ``r`` and the matching
core slices are exactly zero, so the rank can change under ``jax.jit`` while
shapes do not (:func:`mask_columns`, :func:`mask_core`).

Products run at ``Precision.HIGHEST``; the decompositions come from ``eigh``
of small Gram matrices (plus polar factors), which on the CPU is much faster
than a QR or an SVD of a tall matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank_vjp._src import lapack

_HIGHEST = lax.Precision.HIGHEST


def unfold(x: jax.typing.ArrayLike, mode: int) -> jax.Array:
  """Mode-``mode`` unfolding, in TensorLy's order.

  Row ``i`` of the result is the slice ``x[..., i, ...]`` (index ``i`` on
  axis ``mode``) flattened in C order.

  Args:
    x: Tensor ``[n₀, …, n_{d-1}]``.
    mode: The axis that becomes the rows.

  Returns:
    ``[n_mode, Π_{j≠mode} n_j]``.

  Example::

    unfold(jnp.zeros((2, 3, 4)), 1).shape   # (3, 8)
  """
  x = jnp.asarray(x)
  return jnp.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def fold(m: jax.typing.ArrayLike, mode: int,
         shape: Sequence[int]) -> jax.Array:
  """Inverse of :func:`unfold`: ``fold(unfold(x, mode), mode, x.shape) == x``.

  Args:
    m: ``[shape[mode], Π_{j≠mode} shape[j]]``.
    mode: The axis the rows of ``m`` belong to.
    shape: Shape of the folded tensor.

  Returns:
    The tensor ``[*shape]``.

  Example::

    fold(jnp.zeros((3, 8)), 1, (2, 3, 4)).shape   # (2, 3, 4)
  """
  shape = tuple(int(s) for s in shape)
  moved = (shape[mode],) + shape[:mode] + shape[mode + 1:]
  return jnp.moveaxis(jnp.asarray(m).reshape(moved), 0, mode)


def mode_dot(x: jax.typing.ArrayLike, matrix: jax.typing.ArrayLike,
             mode: int) -> jax.Array:
  """Mode product ``x ×_mode matrix``: axis ``mode`` (size K) becomes size n.

  Args:
    x: Tensor ``[…, K, …]``.
    matrix: ``[n, K]``.
    mode: The axis of ``x`` to contract.

  Returns:
    ``[…, n, …]``, i.e. ``fold(matrix @ unfold(x, mode), mode, …)``.

  Example::

    mode_dot(jnp.ones((2, 3, 4)), jnp.ones((5, 3)), 1).shape   # (2, 5, 4)
  """
  y = jnp.tensordot(matrix, x, axes=([1], [mode]), precision=_HIGHEST)
  return jnp.moveaxis(y, 0, mode)


def tucker_product(core: jax.typing.ArrayLike,
                   factors: Sequence[jax.typing.ArrayLike]) -> jax.Array:
  """Full tensor of a Tucker form: ``core ×₀ U₀ ×₁ U₁ … ×_{d-1} U_{d-1}``.

  The modes are expanded in order of growth ``n_i / R_i`` (smallest first),
  which keeps the intermediates small; the result does not depend on it.

  Args:
    core: ``[R₀, …, R_{d-1}]``.
    factors: ``d`` matrices ``[n_i, R_i]``.

  Returns:
    ``[n₀, …, n_{d-1}]``.

  Example::

    core = jnp.ones((2, 2))
    tucker_product(core, [jnp.ones((3, 2)), jnp.ones((4, 2))]).shape  # (3, 4)
  """
  x = jnp.asarray(core)
  factors = [jnp.asarray(u) for u in factors]
  order = sorted(range(len(factors)),
                 key=lambda i: factors[i].shape[0]
                 / max(factors[i].shape[1], 1))
  for i in order:
    x = mode_dot(x, factors[i], i)
  return x


def rank_mask(shape: Sequence[int], ranks: Sequence[Any]) -> jax.Array:
  """``bool[*shape]``: True on the leading ``ranks[i]`` entries of every axis.

  Args:
    shape: Capacity shape ``[R₀, …]``.
    ranks: Active rank per axis (ints or int32 scalars).

  Returns:
    The mask of the active block ``[:r₀, :r₁, …]``.

  Example::

    rank_mask((3, 2), (2, 1))   # [[T, F], [T, F], [F, F]]
  """
  shape = tuple(int(s) for s in shape)
  mask = jnp.ones(shape, bool)
  for i, n in enumerate(shape):
    axis = [1] * len(shape)
    axis[i] = n
    mask = mask & (jnp.arange(n) < ranks[i]).reshape(axis)
  return mask


def mask_columns(u: jax.typing.ArrayLike, rank) -> jax.Array:
  """``u`` ``[n, R]`` with the columns from ``rank`` on set to zero.

  Example::

    mask_columns(jnp.ones((3, 3)), 2)[:, 2]   # [0, 0, 0]
  """
  u = jnp.asarray(u)
  return jnp.where(jnp.arange(u.shape[1]) < rank, u, 0.0)


def mask_core(core: jax.typing.ArrayLike, ranks: Sequence[Any]) -> jax.Array:
  """``core`` with every entry outside the active block set to zero.

  Args:
    core: ``[R₀, …]``.
    ranks: Active rank per axis (see :func:`rank_mask`).

  Returns:
    ``[R₀, …]``, zero outside ``[:r₀, :r₁, …]``.

  Example::

    mask_core(jnp.ones((3, 3)), (1, 2)).sum()   # 2
  """
  core = jnp.asarray(core)
  return jnp.where(rank_mask(core.shape, ranks), core, 0.0)


def param_count(modes: Sequence[int], ranks) -> Any:
  """Parameters of a rank-``ranks`` Tucker tensor: ``Π r_i + Σ n_i r_i``.

  Args:
    modes: Mode sizes ``n_i``.
    ranks: Ranks ``r_i`` (ints, or an int array for traced counts).

  Returns:
    The count, as an int (or an array if ``ranks`` is one).

  Example::

    param_count((3, 3, 16, 32), (3, 3, 8, 8))   # 576 + 9 + 9 + 128 + 256
  """
  if isinstance(ranks, (jax.Array, np.ndarray)):
    ranks = jnp.asarray(ranks)
    return (jnp.prod(ranks)
            + jnp.sum(jnp.asarray(modes, ranks.dtype) * ranks))
  return math.prod(ranks) + sum(
      n * r for n, r in zip(modes, ranks, strict=True))


def orthonormalize(v: jax.typing.ArrayLike,
                   keep: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Polar orthonormalization ``v = q h`` of the kept columns of ``v``.

  ``q = v (vᵀv)^{-1/2}`` is the orthonormal matrix closest to ``v`` (no
  reordering, no sign flips), from a small ``eigh``, which on the CPU is much
  faster than a QR or an SVD of a tall matrix.

  Args:
    v: ``[n, R]`` with linearly independent kept columns.
    keep: ``bool[R]``: columns to orthonormalize; the others become zero.

  Returns:
    ``(q, h)``: ``q`` ``[n, R]`` (zero outside ``keep``) and the symmetric
    ``h = (vᵀv)^{1/2}`` ``[R, R]`` (zero outside the kept block), so that
    ``v ≈ q h`` on the kept columns.

  Example::

    q, h = orthonormalize(jnp.eye(4, 2) * 3.0, jnp.array([True, True]))
    # q is eye(4, 2), h is 3 · eye(2)
  """
  v = jnp.asarray(v)
  keep = jnp.asarray(keep)
  v = jnp.where(keep, v, 0.0)
  gram = jnp.dot(v.T, v, precision=_HIGHEST)
  # Dropped columns get a unit diagonal, so the Gram stays invertible.
  gram = 0.5 * (gram + gram.T) + jnp.diag((~keep).astype(v.dtype))
  lam, vecs = lapack.eigh(gram)
  lam = jnp.maximum(lam, jnp.finfo(v.dtype).tiny)
  inv_sqrt = jnp.dot(vecs / jnp.sqrt(lam), vecs.T, precision=_HIGHEST)
  sqrt = jnp.dot(vecs * jnp.sqrt(lam), vecs.T, precision=_HIGHEST)
  both = keep[:, None] & keep[None, :]
  q = jnp.where(keep, jnp.dot(v, inv_sqrt, precision=_HIGHEST), 0.0)
  return q, jnp.where(both, sqrt, 0.0)


def leading_basis(m: jax.typing.ArrayLike, keep_max,
                  rtol) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Orthonormal basis of the column space of ``m`` by its Gram's ``eigh``.

  Args:
    m: ``[n, R]``.
    keep_max: At most this many columns are returned (int or int32 scalar).
    rtol: Singular values ``≤ rtol`` are treated as zero (an absolute
      threshold, a float or a scalar array).

  Returns:
    ``(basis, singular_values, keep)``: ``[n, R]`` with the leading left
    singular vectors of ``m`` in the kept columns (zero elsewhere), the
    singular values in descending order ``[R]`` and the ``bool[R]`` mask.

  Example::

    basis, sv, keep = leading_basis(jnp.ones((4, 3)), 3, 1e-6)
    # sv ≈ [sqrt(12), 0, 0]; keep = [True, False, False]
  """
  m = jnp.asarray(m)
  gram = jnp.dot(m.T, m, precision=_HIGHEST)
  lam, vecs = lapack.eigh(0.5 * (gram + gram.T))
  lam, vecs = jnp.maximum(lam[::-1], 0.0), vecs[:, ::-1]
  sv = jnp.sqrt(lam)
  keep = (sv > rtol) & (jnp.arange(m.shape[1]) < keep_max)
  basis = jnp.dot(m, vecs, precision=_HIGHEST) / jnp.where(keep, sv, 1.0)
  basis, _ = orthonormalize(basis, keep)
  return basis, sv, keep


def truncated_hosvd(x: jax.typing.ArrayLike, capacity: Sequence[int],
                    ranks: Sequence[Any] | None = None
                    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Truncated HOSVD of ``x`` with static capacities and masked ranks.

  Each factor holds the leading left singular vectors of the mode's
  unfolding (zero-padded when the unfolding has fewer than ``R_i``); the core
  is ``x ×₀ U₀ᵀ ×₁ U₁ᵀ …``, so ``tucker_product(core, factors)`` is the
  orthogonal projection of ``x`` onto the kept subspaces (exactly ``x`` at
  full ranks).

  Args:
    x: Tensor ``[n₀, …]``.
    capacity: ``R_i`` per mode (static).
    ranks: Active ranks ``r_i ≤ R_i`` (ints or int array); ``capacity`` when
      None.

  Returns:
    ``(core, factors)``: ``[R₀, …]`` and ``[n_i, R_i]`` with the leading
    left singular vectors of each unfolding in the first ``r_i`` columns,
    zero after (and the core zero outside the active block).

  Example::

    core, factors = truncated_hosvd(jnp.ones((4, 5, 6)), (2, 2, 2))
    tucker_product(core, factors)   # ≈ jnp.ones((4, 5, 6))
  """
  x = jnp.asarray(x)
  ranks = tuple(capacity) if ranks is None else ranks
  factors = []
  for i, cap in enumerate(capacity):
    u, _, _ = lapack.svd(unfold(x, i), full_matrices=False)
    if u.shape[1] < cap:
      u = jnp.pad(u, ((0, 0), (0, cap - u.shape[1])))
    factors.append(mask_columns(u[:, :cap], ranks[i]))
  core = x
  for i, u in enumerate(factors):
    core = mode_dot(core, u.T, i)
  return core, tuple(factors)
