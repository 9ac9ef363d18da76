"""Tests for lowrank_vjp._src.activations: ReLU / ReLU6 with 1-bit masks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import lowrank_vjp as lv

PAIRS = [(lv.relu, jax.nn.relu), (lv.relu6, jax.nn.relu6)]
PAIR_IDS = ["relu", "relu6"]
# Sizes not divisible by 8 or 32, a scalar, and multi-dimensional shapes.
SHAPES = [(), (1,), (7,), (13,), (32,), (33,), (3, 5, 3), (2, 9, 9, 5)]


def _input(shape, dtype, seed=0):
  """Random values with the kinks 0 and 6 (and ±0, beyond 6) planted."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-3, 9, size=shape)
  flat = x.reshape(-1)
  special = [0.0, 6.0, -0.0, 6.5, -1.0, 3.0]
  flat[:min(len(special), flat.size)] = special[:flat.size]
  return jnp.asarray(x, dtype)


@pytest.mark.parametrize("dtype,jit", [
    ("float32", False), ("float32", True), ("bfloat16", True),
    ("float64", True)], ids=["f32-eager", "f32-jit", "bf16-jit", "f64-jit"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ours,theirs", PAIRS, ids=PAIR_IDS)
def test_values_and_grads_match_jax_nn(ours, theirs, shape, dtype, jit):
  with jax.enable_x64(dtype == "float64"):
    x = _input(shape, dtype)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(shape), dtype)

    def vjp(f):
      y, pullback = jax.vjp(f, x)
      return y, pullback(g)[0]

    run = jax.jit(vjp, static_argnums=0) if jit else vjp
    y, dx = run(ours)
    y_want, dx_want = run(theirs)
  assert y.dtype == y_want.dtype == x.dtype and y.shape == shape
  assert dx.dtype == dx_want.dtype and dx.shape == shape
  np.testing.assert_array_equal(np.asarray(y, np.float64),
                                np.asarray(y_want, np.float64))
  np.testing.assert_array_equal(np.asarray(dx, np.float64),
                                np.asarray(dx_want, np.float64))


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=PAIR_IDS)
def test_grad_at_the_kinks_is_zero(ours, theirs):
  x = jnp.asarray([0.0, -0.0, 6.0, 1e-30, 5.999, 6.001, -1e-30])
  ones = jnp.ones_like(x)
  got = jax.vjp(ours, x)[1](ones)[0]
  want = jax.vjp(theirs, x)[1](ones)[0]
  np.testing.assert_array_equal(got, want)
  assert got[0] == 0.0 and got[1] == 0.0  # 0 at x = 0, as jax.nn.relu
  if ours is lv.relu6:
    np.testing.assert_array_equal(got, [0, 0, 0, 1, 1, 0, 0])


@pytest.mark.parametrize("ours", [lv.relu, lv.relu6], ids=PAIR_IDS)
def test_second_order_through_grad_of_sum(ours):
  """The gradient is usable inside a larger differentiated function."""
  x = _input((5, 7), jnp.float32, seed=3)
  w = jnp.asarray(np.random.default_rng(4).standard_normal((7, 3)),
                  jnp.float32)
  f = lambda w: jnp.sum(ours(x @ w) ** 2)
  g = jax.grad(f)(w)
  theirs = jax.nn.relu if ours is lv.relu else jax.nn.relu6
  g_want = jax.grad(lambda w: jnp.sum(theirs(x @ w) ** 2))(w)
  np.testing.assert_allclose(g, g_want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ours", [lv.relu, lv.relu6], ids=PAIR_IDS)
def test_saved_residual_is_a_packed_bit_mask(ours, shape):
  x = _input(shape, jnp.float32)
  size = math.prod(shape)
  words = math.ceil(size / 32)
  saved = saved_residuals(ours, x)
  assert len(saved) == 1, saved
  aval = saved[0][0]
  assert aval.dtype == jnp.uint32 and aval.shape == (words,)
  # The same from the VJP closure: no float array is kept, only the mask.
  _, pullback = jax.vjp(ours, x)
  leaves = jax.tree_util.tree_leaves(pullback)
  assert [leaf.dtype for leaf in leaves] == [jnp.uint32]
  nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
  assert nbytes == 4 * words
  assert nbytes <= size / 8 + 4  # one bit per element, up to word padding


def test_residual_is_much_smaller_than_jax_nn_relu():
  x = _input((4, 16, 16, 8), jnp.float32)
  ours = sum(a.size * a.dtype.itemsize for a, _ in saved_residuals(lv.relu, x))
  theirs = sum(a.size * a.dtype.itemsize
               for a, _ in saved_residuals(jax.nn.relu, x))
  assert ours * 32 <= theirs  # 1 bit vs at least 32
