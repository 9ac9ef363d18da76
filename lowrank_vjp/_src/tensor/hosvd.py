"""ε-truncated HOSVD and batch-mode SVD by mode Gram matrices and ``eigh``.

Every function here is pure and jittable; shapes depend only on static
capacities. Factors come from the eigenvectors of the mode Gram matrix
``A_(n) A_(n)ᵀ`` (``I_n × I_n``), or of the dual Gram ``A_(n)ᵀ A_(n)`` when the
unfolding has fewer columns than rows, which costs far less than an SVD of the
unfolding (see docs/methods.md). Grams accumulate in float32 (float64 under
x64) at ``Precision.HIGHEST`` whatever the activation's dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from lowrank_vjp._src import lapack
from lowrank_vjp._src import schedule
from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src import vma
from lowrank_vjp._src.tensor import tucker as tucker_lib

_HIGHEST = lax.Precision.HIGHEST


def compute_dtype(dtype) -> jnp.dtype:
  """Accumulation dtype for an activation dtype: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def _split(shape, axis):
  """``(P, I, Q)``: sizes before, at and after ``axis``."""
  return (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))


def mode_gram(x: jax.Array, axis: int, dual: bool = False) -> jax.Array:
  """Gram matrix of the mode-``axis`` unfolding.

  The contraction is laid out so that XLA needs no transposed copy of ``x``
  (seen costing one activation-sized buffer per mode otherwise): ``x`` is
  viewed as ``[P, I, Q]`` (sizes before, at and after ``axis``) and the Gram
  is a plain matrix product for the first and last axes, and a batched one
  summed over ``P`` for middle axes when that intermediate (``P·I²``) is no
  larger than ``x``.

  Args:
    x: Activation of any shape.
    axis: The mode.
    dual: Return ``A_(n)ᵀ A_(n)`` (``M × M``, M the product of the other axes)
      instead of ``A_(n) A_(n)ᵀ`` (``I_n × I_n``).

  Returns:
    The Gram matrix in :func:`compute_dtype` of ``x.dtype``.
  """
  ct = compute_dtype(x.dtype)
  dot = functools.partial(lax.dot_general, precision=_HIGHEST,
                          preferred_element_type=ct)
  p, i, q = _split(x.shape, axis)
  if dual:
    a = jnp.moveaxis(x, axis, 0).reshape(i, p * q)
    return dot(a, a, (((0,), (0,)), ((), ())))
  if p == 1:
    a = x.reshape(i, q)
    return dot(a, a, (((1,), (1,)), ((), ())))
  if q == 1:
    a = x.reshape(p, i)
    return dot(a, a, (((0,), (0,)), ((), ())))
  if i <= q:
    a = x.reshape(p, i, q)
    return jnp.sum(dot(a, a, (((2,), (2,)), ((0,), (0,)))), axis=0)
  a = x.reshape(p, i, q)
  chunks = _gram_chunks(p)
  if chunks == 1:
    return dot(a, a, (((0, 2), (0, 2)), ((), ())))
  # The contraction over (P, Q) needs x transposed to [P·Q, I]: done one
  # slab of P at a time, so the copy is a slab, not the whole activation.
  def add_slab(gram, slab):
    return gram + dot(slab, slab, (((0, 2), (0, 2)), ((), ()))), None

  zeros = vma.like(jnp.zeros((i, i), ct), x)  # x's type inside shard_map
  gram, _ = lax.scan(add_slab, zeros, a.reshape(chunks, p // chunks, i, q))
  return gram


_MIN_SLABS = 16
_MAX_SLABS = 256


def _gram_chunks(p: int) -> int:
  """Slabs of a middle-axis Gram: the smallest divisor of ``p`` from 16 on.

  1 (one contraction, one activation-sized transposed copy) when ``p`` has
  no divisor between 16 and 256 (a loop of more steps would be slow).
  """
  for n in range(_MIN_SLABS, min(p, _MAX_SLABS) + 1):
    if p % n == 0:
      return n
  return 1


def eps_rank(eigvals: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Fewest leading components whose explained variance reaches ``eps``.

  Args:
    eigvals: ``[I]`` non-negative eigenvalues in descending order.
    eps: Target fraction in ``(0, 1]``.

  Returns:
    ``(rank, total)``: the rank (int32, between 1 and ``I``) and the total
    variance. For ``eps == 1`` the rank is ``I`` (rounding can leave the
    cumulative ratio a hair under 1). For an all-zero or non-finite
    activation the rank is 1.
  """
  size = eigvals.shape[0]
  total = jnp.sum(eigvals)
  if eps >= 1.0:
    return jnp.asarray(size, jnp.int32), total
  safe_total = jnp.where(total > 0, total, 1.0)
  ratio = jnp.cumsum(eigvals) / safe_total
  rank = 1 + jnp.sum(ratio < eps, dtype=jnp.int32)
  rank = jnp.where(jnp.isfinite(total) & (total > 0), rank, 1)
  return jnp.minimum(rank, size).astype(jnp.int32), total


def leading_factor(x: jax.Array, axis: int, capacity: int, eps: float):
  """ε-masked leading left singular vectors of the mode-``axis`` unfolding.

  Args:
    x: Activation.
    axis: The mode.
    capacity: Static number of columns to return.
    eps: Explained-variance target.

  Returns:
    ``(factor, needed, kept, energy)``: ``factor`` is ``[I, capacity]`` with
    the columns beyond ``kept = min(needed, capacity)`` set to zero;
    ``needed`` is the ε-rank; ``energy`` the explained variance kept.
  """
  size = x.shape[axis]
  other = x.size // max(size, 1)
  dual = other < size
  gram = mode_gram(x, axis, dual=dual)
  gram = 0.5 * (gram + gram.T)
  eigvals, eigvecs = lapack.eigh(gram)
  eigvals = jnp.maximum(eigvals[::-1], 0.0)
  eigvecs = eigvecs[:, ::-1]
  if dual:
    # Left vectors from right ones: u_k = A v_k / σ_k (zero where σ_k = 0).
    a = jnp.moveaxis(x, axis, 0).reshape(size, other).astype(gram.dtype)
    sigma = jnp.sqrt(eigvals)
    scale = jnp.where(sigma > sigma[0] * jnp.finfo(gram.dtype).eps * other,
                      1.0 / jnp.where(sigma > 0, sigma, 1.0), 0.0)
    eigvecs = jnp.dot(a, eigvecs, precision=_HIGHEST) * scale
    pad = size - eigvals.shape[0]
    eigvals = jnp.pad(eigvals, (0, pad))
    eigvecs = jnp.pad(eigvecs, ((0, 0), (0, pad)))
  needed, total = eps_rank(eigvals, eps)
  # The unfolding has rank <= min(size, other); eps = 1 would otherwise ask
  # for `size` components of a dual Gram and flag a false overflow.
  needed = jnp.minimum(needed, min(size, other)).astype(jnp.int32)
  kept = jnp.minimum(needed, capacity)
  mask = jnp.arange(capacity) < kept
  factor = jnp.where(mask, eigvecs[:, :capacity], 0.0)
  kept_var = jnp.sum(jnp.where(mask, eigvals[:capacity], 0.0))
  energy = jnp.where(total > 0, kept_var / jnp.where(total > 0, total, 1.0),
                     1.0)
  energy = jnp.where(jnp.isfinite(total), energy, jnp.nan)
  return factor, needed, kept, energy.astype(jnp.float32)


def mode_product(x: jax.Array, axis: int, factor: jax.Array) -> jax.Array:
  """``x ×_axis factorᵀ``: axis ``axis`` of size I becomes size K."""
  p, i, q = _split(x.shape, axis)
  k = factor.shape[1]
  out_shape = x.shape[:axis] + (k,) + x.shape[axis + 1:]
  dot = functools.partial(lax.dot_general, precision=_HIGHEST)
  if q == 1:    # [P, I] @ [I, K]: a plain matrix product, no transpose.
    return dot(x.reshape(p, i), factor, (((1,), (0,)), ((), ()))).reshape(
        out_shape)
  if p == 1:    # [K, I] @ [I, Q].
    return dot(factor, x.reshape(i, q), (((0,), (0,)), ((), ()))).reshape(
        out_shape)
  y = dot(x.reshape(p, i, q), factor, (((1,), (0,)), ((), ())))  # [P, Q, K]
  return jnp.swapaxes(y, 1, 2).reshape(out_shape)


def project(x: jax.Array, factors) -> jax.Array:
  """Core ``x ×ₐ Uₐᵀ`` over the axes whose factor is not None.

  The last axis goes first and the first axis second: both are plain matrix
  products that need no transposed copy of the full ``x``; the middle axes
  follow on the already reduced tensor.

  Args:
    x: Activation ``[I_0, …]``.
    factors: ``[I_a, K_a]`` or None per axis.

  Returns:
    Core ``[K_0, …]`` in the factors' dtype.
  """
  ct = compute_dtype(x.dtype)
  n = x.ndim
  order = [n - 1, 0] + list(range(1, n - 1)) if n > 1 else [0]
  core = x.astype(ct)
  for axis in order:
    if factors[axis] is not None:
      core = mode_product(core, axis, factors[axis].astype(ct))
  return core


def normalize(x: jax.Array):
  """Scales ``x`` by a power of two so that its largest magnitude is ~1.

  The mode Grams square the activation's entries: in float32 they overflow
  above about 1e18 and lose everything below about 1e-19. A power-of-two
  scale is exact, leaves the eigenvectors and the variance ratios unchanged,
  and is undone on the core. Non-finite or all-zero activations are left as
  they are.

  Returns:
    ``(scaled x, unscale factor)`` in the compute dtype.
  """
  ct = compute_dtype(x.dtype)
  peak = jnp.max(jnp.abs(x)).astype(ct)
  ok = jnp.isfinite(peak) & (peak > 0)
  info = jnp.finfo(ct)
  exponent = jnp.where(ok, jnp.floor(jnp.log2(jnp.where(ok, peak, 1.0))), 0.0)
  exponent = jnp.clip(exponent, info.minexp, info.maxexp - 1)
  unscale = _power_of_two(exponent, ct)
  # A division, not a multiplication by 2**-exponent (the same exact
  # result): XLA counts a division as expensive and computes the scaled
  # activation once, where it copied a cheap multiply into the input fusion
  # of each mode Gram and held up to four activation-sized buffers at once
  # (one 64x7x7x960 conv: 49.8 MiB of temp against vanilla's 19.1 on the
  # CPU; 24.6 with the division). The divisor is built from its bits:
  # XLA rewrites a division by exp(...) into a multiplication. And it is
  # made elementwise (schedule.divided_once): XLA also rewrites a division
  # by a broadcast scalar into a product by its reciprocal, and ASI's
  # products, which read the activation in four shapes, held four scaled
  # copies of MobileNetV2's first expansion (147 MiB each at batch 32).
  return schedule.divided_once(x.astype(ct), unscale), unscale


def _power_of_two(exponent: jax.Array, dtype) -> jax.Array:
  """``2**exponent`` for an integral, in-range ``exponent``, from its bits."""
  info = jnp.finfo(dtype)
  bits = jnp.dtype(f"int{info.bits}")
  mantissa = info.nmant
  bias = info.maxexp - 1
  biased = (exponent.astype(bits) + bias) << mantissa
  return lax.bitcast_convert_type(biased, dtype)


def tucker_compress(x: jax.Array, capacity, eps: float, method: str,
                    normalized: bool = False):
  """Compresses ``x`` into a :class:`TuckerResidual` and reports what it kept.

  Args:
    x: Activation of any shape (float dtype).
    capacity: Static rank capacity per axis (None = leave uncompressed), as
      from a Tucker method's ``capacity``.
    eps: Explained-variance target per compressed mode.
    method: Name recorded in the statistics.
    normalized: ``x`` is already scaled by :func:`normalize` (then it is not
      scaled again, which would cost one more activation-sized copy).

  Returns:
    ``(residual, stats)``: a :class:`TuckerResidual` whose core is in
    ``tucker.core_dtype(x.dtype)`` and a :class:`CompressionStats`.
  """
  x = lax.stop_gradient(x)
  dtype = x.dtype
  if normalized:
    x = x.astype(compute_dtype(dtype))
    unscale = jnp.ones((), x.dtype)
  else:
    x, unscale = normalize(x)
  factors, needed, kept, energy = [], [], [], []
  for axis, cap in enumerate(capacity):
    if cap is None:
      factors.append(None)
      needed.append(jnp.asarray(x.shape[axis], jnp.int32))
      kept.append(jnp.asarray(x.shape[axis], jnp.int32))
      energy.append(jnp.asarray(1.0, jnp.float32))
      continue
    f, n, k, e = leading_factor(x, axis, cap, eps)
    factors.append(f)
    needed.append(n)
    kept.append(k)
    energy.append(e)
  factors = tuple(factors)
  core = (project(x, factors) * unscale).astype(tucker_lib.core_dtype(dtype))
  # A reader of the scaled ``x`` in its own shape (a reduction, for the
  # never-true select): where every other reader views it as a matrix (the
  # batch-mode SVD's Gram and projection), XLA otherwise folds that reshape
  # into the scaling's fusion, whose output then cannot take over the
  # input's buffer: two activations alive instead of one (MobileNetV2's
  # first expansion under SVD, tests/ops/test_ops_vjp_memory.py).
  core = schedule.tie(core, x)
  residual = tucker_lib.TuckerResidual(core=core, factors=factors)
  needed = jnp.stack(needed)
  stats = stats_lib.CompressionStats(
      needed_ranks=needed,
      kept_ranks=jnp.stack(kept),
      kept_energy=jnp.stack(energy),
      overflow=jnp.any(needed > jnp.stack(kept)),
      shape=tuple(x.shape),
      capacity=tuple(capacity),
      method=method,
      itemsize=jnp.dtype(dtype).itemsize,
      residual_nbytes=residual.nbytes,
  )
  return residual, stats
