"""Tests for lowrank_vjp._src.residuals: TuckerResidual, CompressionStats."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
from lowrank_vjp._src.tensor import hosvd as decompositions
from lowrank_vjp._src.tensor import tucker as residuals


def _residual(shape, ranks, core_dtype=jnp.float32, factor_dtype=jnp.float32):
  rng = np.random.default_rng(0)
  core_shape = tuple(n if r is None else r
                     for n, r in zip(shape, ranks, strict=True))
  core = jnp.asarray(rng.standard_normal(core_shape), core_dtype)
  factors = tuple(None if r is None else
                  jnp.asarray(rng.standard_normal((n, r)), factor_dtype)
                  for n, r in zip(shape, ranks, strict=True))
  return residuals.TuckerResidual(core, factors)


@pytest.mark.parametrize("shape,ranks", [
    ((4, 5, 6), (2, 3, 4)), ((4, 5, 6), (2, None, 3)),
    ((8, 3), (8, None)), ((2, 7, 7, 3), (1, 2, 2, 3)),
    ((5,), (None,))])
@pytest.mark.parametrize("core_dtype", [jnp.float32, jnp.bfloat16])
def test_nbytes_matches_formula(shape, ranks, core_dtype):
  res = _residual(shape, ranks, core_dtype)
  want = residuals.tucker_nbytes(shape, ranks,
                                 jnp.dtype(core_dtype).itemsize, 4)
  assert res.nbytes == want
  # The formula itself: itemsize(core)·Π K + itemsize(U)·Σ I·K.
  core = math.prod(n if r is None else r
                   for n, r in zip(shape, ranks, strict=True))
  fac = sum(n * r for n, r in zip(shape, ranks, strict=True) if r is not None)
  assert want == core * jnp.dtype(core_dtype).itemsize + fac * 4
  # ... and it is what the arrays hold.
  leaves = jax.tree_util.tree_leaves(res)
  assert res.nbytes == sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
  assert res.shape == shape


def test_tucker_nbytes_examples():
  assert residuals.tucker_nbytes((10, 20), (2, 3), 4, 4) == (
      6 * 4 + (20 + 60) * 4)
  assert residuals.tucker_nbytes((10, 20), (None, 3), 2, 4) == (
      30 * 2 + 60 * 4)
  assert residuals.tucker_nbytes((10, 20), (None, None), 4, 4) == 800


def test_residual_is_a_pytree_keeping_none_factors():
  res = _residual((4, 5, 6), (2, None, 3))
  leaves, treedef = jax.tree_util.tree_flatten(res)
  assert len(leaves) == 3
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert back.factors[1] is None
  doubled = jax.tree_util.tree_map(lambda a: 2 * a, res)
  np.testing.assert_allclose(doubled.reconstruct(), 8 * res.reconstruct(),
                             rtol=1e-5, atol=1e-5)
  assert lv.TuckerResidual is residuals.TuckerResidual


def test_reconstruct_matches_numpy_and_dtype():
  res = _residual((4, 5, 6), (2, None, 3))
  core = np.asarray(res.core, np.float64)
  u0, u2 = (np.asarray(f, np.float64) for f in (res.factors[0],
                                                  res.factors[2]))
  want = np.einsum("ibk,ai,ck->abc", core, u0, u2)
  np.testing.assert_allclose(res.reconstruct(), want, rtol=1e-5, atol=1e-5)
  assert res.reconstruct().dtype == jnp.float32
  assert res.reconstruct(dtype=jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("method,capacity", [("hosvd", (3, 2, 4)),
                                             ("svd", (3, None, None))])
def test_stats_bytes(method, capacity):
  shape = (6, 5, 4)
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape),
                  jnp.float32)
  res, stats = decompositions.tucker_compress(x, capacity, 0.8, method)
  assert isinstance(stats, lv.CompressionStats)
  assert stats.residual_nbytes == res.nbytes == residuals.tucker_nbytes(
      shape, capacity, 4, 4)
  assert stats.activation_nbytes == 4 * math.prod(shape)
  needed = [int(k) for k in stats.needed_ranks]
  ranks = [k if c is not None else None
           for k, c in zip(needed, capacity, strict=True)]
  assert stats.analytic_nbytes() == residuals.tucker_nbytes(shape, ranks, 4,
                                                            4)
  # Static fields survive a trip through jit as pytree metadata.
  out = jax.jit(lambda s: s)(stats)
  assert (out.shape, out.capacity, out.method) == (shape, capacity, method)


def test_tie_and_after_keep_values_nan_included():
  y = jnp.asarray([1.0, np.nan, -np.inf, 0.0])
  res = _residual((4, 5), (2, 3))
  np.testing.assert_array_equal(residuals.tie(y, res), y)
  g = jnp.asarray([np.nan, 2.0])
  np.testing.assert_array_equal(residuals.after(y, g), y)
  np.testing.assert_array_equal(jax.jit(residuals.tie)(y, res), y)


@pytest.mark.parametrize("method,bits,want", [
    ("gradfilter", 8, 2 * 4 * 4 * 8 * 4),   # 2x2-pooled 8x8 activation
    ("quant", 4, 2 * 8 * 8 * 8 // 2),      # two 4-bit codes per byte
    ("none", 8, 2 * 8 * 8 * 8 * 4),
])
def test_analytic_nbytes_of_methods_without_ranks(method, bits, want):
  """Shape-only methods count what they save, not the full activation."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
  w = jax.random.normal(jax.random.key(1), (3, 3, 8, 4))
  conv = lv.compressed_conv(method=method, bits=bits)
  _, stats = conv.with_stats(x, w, (1, 1), "SAME",
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert stats.analytic_nbytes() == stats.residual_nbytes
  assert stats.residual_nbytes >= want
  assert stats.residual_nbytes <= want + 64   # per-tensor scale and offset
