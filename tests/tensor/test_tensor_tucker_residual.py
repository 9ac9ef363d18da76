"""Tests for lowrank_vjp._src.tensor.tucker: TuckerResidual, tucker_nbytes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
from lowrank_vjp._src.tensor import tucker


def _residual(shape, ranks, core_dtype=jnp.float32, factor_dtype=jnp.float32):
  rng = np.random.default_rng(0)
  core_shape = tuple(n if r is None else r
                     for n, r in zip(shape, ranks, strict=True))
  core = jnp.asarray(rng.standard_normal(core_shape), core_dtype)
  factors = tuple(None if r is None else
                  jnp.asarray(rng.standard_normal((n, r)), factor_dtype)
                  for n, r in zip(shape, ranks, strict=True))
  return tucker.TuckerResidual(core, factors)


@pytest.mark.parametrize("shape,ranks", [
    ((4, 5, 6), (2, 3, 4)), ((4, 5, 6), (2, None, 3)),
    ((8, 3), (8, None)), ((2, 7, 7, 3), (1, 2, 2, 3)),
    ((5,), (None,))])
@pytest.mark.parametrize("core_dtype", [jnp.float32, jnp.bfloat16])
def test_nbytes_matches_formula(shape, ranks, core_dtype):
  res = _residual(shape, ranks, core_dtype)
  want = tucker.tucker_nbytes(shape, ranks, jnp.dtype(core_dtype).itemsize, 4)
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
  assert tucker.tucker_nbytes((10, 20), (2, 3), 4, 4) == (
      6 * 4 + (20 + 60) * 4)
  assert tucker.tucker_nbytes((10, 20), (None, 3), 2, 4) == (
      30 * 2 + 60 * 4)
  assert tucker.tucker_nbytes((10, 20), (None, None), 4, 4) == 800


def test_residual_is_a_pytree_keeping_none_factors():
  res = _residual((4, 5, 6), (2, None, 3))
  leaves, treedef = jax.tree_util.tree_flatten(res)
  assert len(leaves) == 3
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert back.factors[1] is None
  doubled = jax.tree_util.tree_map(lambda a: 2 * a, res)
  np.testing.assert_allclose(doubled.reconstruct(), 8 * res.reconstruct(),
                             rtol=1e-5, atol=1e-5)
  assert lv.TuckerResidual is tucker.TuckerResidual


def test_reconstruct_matches_numpy_and_dtype():
  res = _residual((4, 5, 6), (2, None, 3))
  core = np.asarray(res.core, np.float64)
  u0, u2 = (np.asarray(f, np.float64) for f in (res.factors[0],
                                                  res.factors[2]))
  want = np.einsum("ibk,ai,ck->abc", core, u0, u2)
  np.testing.assert_allclose(res.reconstruct(), want, rtol=1e-5, atol=1e-5)
  assert res.reconstruct().dtype == jnp.float32
  assert res.reconstruct(dtype=jnp.bfloat16).dtype == jnp.bfloat16
