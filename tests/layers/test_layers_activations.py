"""Tests for lowrank_vjp._src.layers.activations.

ReLU / ReLU6 saving 1-bit masks, and hard-swish, SiLU and GELU saving a
coded slope.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf
from lowrank_vjp._src.layers import activations

PAIRS = [(lv.relu, jax.nn.relu), (lv.relu6, jax.nn.relu6)]
PAIR_IDS = ["relu", "relu6"]
CODED_PAIRS = {
    "hard_swish": (lv.hard_swish, jax.nn.hard_swish),
    "silu": (lv.silu, jax.nn.silu),
    "gelu": (lv.gelu, functools.partial(jax.nn.gelu, approximate=False)),
    "gelu_tanh": (functools.partial(lv.gelu, approximate=True),
                  functools.partial(jax.nn.gelu, approximate=True)),
}
DN = ("NHWC", "HWIO", "NHWC")
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


# ------------------------------------- smooth activations, coded slope ---


def _grid():
  # Every kink of hard-swish, both flat ends, and values in between.
  return jnp.concatenate([jnp.linspace(-8, 8, 1001),
                          jnp.array([-3.0, 3.0, 0.0, -1.5])])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(CODED_PAIRS))
def test_forward_exact_and_slope_error_bounded(name, bits):
  ours, ref = CODED_PAIRS[name]
  x = _grid()
  np.testing.assert_array_equal(ours(x, bits=bits), ref(x))
  g = jax.random.normal(jax.random.PRNGKey(0), x.shape)
  _, vjp = jax.vjp(lambda x: ours(x, bits=bits), x)
  _, ref_vjp = jax.vjp(ref, x)
  slope = vjp(jnp.ones_like(x))[0]
  exact = ref_vjp(jnp.ones_like(x))[0]
  n, _ = activations.slope_grid(name.replace("_tanh", ""), bits)
  assert float(jnp.max(jnp.abs(slope - exact))) <= 0.5 / n + 1e-6
  # The gradient is g times the coded slope.
  np.testing.assert_allclose(vjp(g)[0], g * slope, rtol=1e-6)
  # Slopes 0 and 1 are levels of the code: exact.
  flat = (jnp.abs(exact) < 1e-9) | (jnp.abs(exact - 1) < 1e-9)
  np.testing.assert_array_equal(slope[flat], jnp.round(exact[flat]))


def test_hard_swish_flat_parts_exact():
  x = jnp.array([-9.0, -3.0, -3.5, 3.0, 3.5, 10.0])
  g = jax.grad(lambda x: jnp.sum(lv.hard_swish(x)))(x)
  ref = jax.grad(lambda x: jnp.sum(jax.nn.hard_swish(x)))(x)
  np.testing.assert_array_equal(g, ref)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(), (7,), (33,), (2, 9, 9, 5)])
def test_residual_is_packed_slope_codes(shape, bits):
  x = jnp.ones(shape)
  for name, (ours, _) in CODED_PAIRS.items():
    total = lv.measure.vjp_residual_bytes(
        lambda x, fn=ours: fn(x, bits=bits), x)
    assert total == 4 * math.ceil(max(x.size, 1) * bits / 32), name


def test_bits_validated():
  for fn in (lv.hard_swish, lv.silu, lv.gelu):
    with pytest.raises(ValueError, match="bits"):
      fn(jnp.ones(3), bits=2)


def test_xla_keeps_codes_not_the_input():
  # A stack of compressed convs with hard-swish: per layer XLA keeps the
  # conv's residual plus the 8-bit slope codes, not the f32 pre-activation.
  shape = (8, 16, 16, 8)
  act = 4 * math.prod(shape)
  conv = lv.compressed_conv(method="quant", bits=4)

  def build(act_fn):
    def make(depth):
      key = jax.random.PRNGKey(0)
      x = jax.random.normal(key, shape)
      ws = [0.2 * jax.random.normal(jax.random.fold_in(key, i),
                                    (3, 3, 8, 8)) for i in range(depth)]

      def loss(ws, x):
        for w in ws:
          x = act_fn(conv(x, w, (1, 1), "SAME", dimension_numbers=DN))
        return jnp.sum(x)

      def step(ws, x):
        return [jnp.sum(g * g) for g in jax.grad(loss)(ws, x)]
      return jax.jit(step), (ws, x)
    return make

  ours, _ = lv.measure.temp_bytes_per_layer(build(lv.hard_swish), (4, 8))
  formula = act / 8 + 8 + act / 4        # 4-bit input codes + 8-bit slope
  assert 0.85 * formula <= ours <= 1.15 * formula, (ours, formula)
  # jax.nn.hard_swish would keep its f32 input (jaxpr level shown here).
  x = jnp.ones(shape)
  assert lv.measure.vjp_residual_bytes(jax.nn.hard_swish, x) >= act


def test_works_under_jit_and_vmap():
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
  f = jax.jit(jax.grad(lambda x: jnp.sum(lv.silu(x) ** 2)))
  g = jax.vmap(jax.grad(lambda x: jnp.sum(lv.silu(x) ** 2)))(x)
  np.testing.assert_allclose(f(x), g, rtol=1e-6)
  ref = jax.grad(lambda x: jnp.sum(jax.nn.silu(x) ** 2))(x)
  np.testing.assert_allclose(f(x), ref, atol=0.02)


# ------------------------------------------------ non-finite inputs ---

_NON_FINITE = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 1.0, -1.0, 0.0])


@pytest.mark.parametrize("fn", [lv.hard_swish, lv.silu, lv.gelu],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("bits", [4, 8])
def test_nan_in_gives_nan_out_and_infinite_slopes_have_their_limits(fn, bits):
  """They used to code NaN as a finite slope (-0.504 for hard-swish)."""
  grad = jax.grad(lambda v: fn(v, bits=bits).sum())(_NON_FINITE)
  assert bool(jnp.isnan(grad[0]))
  assert float(grad[1]) == 1.0 and float(grad[2]) == 0.0
  assert bool(jnp.all(jnp.isfinite(grad[3:])))
  # Where JAX's own slope is finite, it is matched (hard-swish at ±inf too).
  ref = jax.grad(lambda v: {"hard_swish": jax.nn.hard_swish,
                            "silu": jax.nn.silu,
                            "gelu": lambda u: jax.nn.gelu(
                                u, approximate=False)}[fn.__name__](v).sum())(
      _NON_FINITE)
  finite = np.isfinite(np.asarray(ref))
  np.testing.assert_allclose(np.asarray(grad)[finite],
                             np.asarray(ref)[finite], atol=0.1)


@pytest.mark.parametrize("fn", [lv.hard_swish, lv.silu, lv.gelu],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("bits", [8.0, True, "8", np.float32(4)])
def test_bits_must_be_an_int(fn, bits):
  with pytest.raises(ValueError, match="bits"):
    fn(jnp.ones(3), bits=bits)


def test_residual_stream_of_relu_blocks_is_computed_once():
  """lv.relu's output is one buffer that every consumer reads.

  Before, XLA recomputed the stream ``x = relu(x + conv(relu(conv(x))))`` in
  each consumer from the raw convolution outputs of all earlier blocks and
  kept those alive: 6.49 x one activation of temp here. With lv.relu's
  output through schedule.computed_once 4.00; the same code with the
  output left to fuse into its readers 5.00.
  """
  class Chain(nn.Module):

    @nn.compact
    def __call__(self, x):
      conv = lvf.conv_cls("hosvd", eps=0.9)
      for _ in range(3):
        h = lv.relu(nn.Conv(16, (3, 3), conv_general_dilated_cls=conv)(x))
        x = lv.relu(x + nn.Conv(16, (3, 3), conv_general_dilated_cls=conv)(h))
      return x

  model, x = Chain(), jnp.zeros((32, 24, 24, 16))
  params = model.init(jax.random.key(0), x)["params"]

  def loss(params, x):
    y, _ = model.apply({"params": params}, x, mutable=["compression"])
    return jnp.sum(y * y)

  temp = lv.measure.xla_memory(jax.grad(loss), params, x).temp_bytes
  assert temp < 4.5 * x.size * 4, temp / (x.size * 4)
