"""Tests for lowrank_vjp._src.dropins: the public drop-ins.

Call forms (positional, keyword, decorator), composition with JAX
transforms, argument errors, degenerate activations, overflow reporting,
statistics, and the weight-gradient error on natural images.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from jax import lax

import lowrank_vjp as lv
from lowrank_vjp._src.ops import conv_tucker as conv_rule
from lowrank_vjp._src.tensor import hosvd as decompositions

DN = ("NHWC", "HWIO", "NHWC")
KW = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN)


def _operands(x_shape=(3, 7, 7, 4), w_shape=(3, 3, 4, 5), seed=0,
              dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  w = jnp.asarray(rng.standard_normal(w_shape) / math.sqrt(
      math.prod(w_shape[:-1])), dtype)
  return x, w


def _rel_err(actual, expected) -> float:
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
  return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


def _grads(f, x, w, seed=1, jit=True):
  """``(y, dx, dw)`` of ``f(x, w)`` for a fixed random cotangent."""
  out = jax.eval_shape(f, x, w)
  g = jnp.asarray(np.random.default_rng(seed).standard_normal(out.shape),
                  out.dtype)

  def run(x, w, g):
    y, vjp = jax.vjp(f, x, w)
    return (y,) + vjp(g)

  return (jax.jit(run) if jit else run)(x, w, g)


def _lax_conv(x, w, **kw):
  return lax.conv_general_dilated(x, w, **(kw or KW))


def _assert_exact(got, want, tol=1e-5):
  for a, b, name in zip(got, want, ("y", "dx", "dw"), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    assert _rel_err(a, b) <= tol, (name, _rel_err(a, b))


# ---------------------------------------------------------- call forms ---


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_drop_in_positional_and_keyword_calls(jit):
  x, w = _operands()
  conv = lv.compressed_conv(eps=1.0, on_overflow="error")
  want = _grads(lambda a, b: _lax_conv(a, b), x, w, jit=jit)
  calls = [
      lambda a, b: conv(a, b, (1, 1), "SAME", None, None, DN),
      lambda a, b: conv(a, b, (1, 1), "SAME", None, None, DN, 1, 1, None,
                        None),
      lambda a, b: conv(a, b, window_strides=(1, 1), padding="SAME",
                        dimension_numbers=DN),
      lambda a, b: conv(lhs=a, rhs=b, window_strides=[1, 1],
                        padding="SAME", dimension_numbers=DN),
      lambda a, b: conv(a, b, (1, 1), [(1, 1), (1, 1)],
                        dimension_numbers=DN, out_sharding=None),
      lambda a, b: conv(a, b, (1, 1), "SAME", dimension_numbers=DN,
                        precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32),
  ]
  for call in calls:
    _assert_exact(_grads(call, x, w, jit=jit), want)


def test_default_dimension_numbers_are_lax_defaults():
  x, w = _operands((2, 4, 7, 6), (5, 4, 3, 3))  # NCHW / OIHW
  conv = lv.compressed_conv(method="svd", eps=1.0, on_overflow="error")
  got = _grads(lambda a, b: conv(a, b, (2, 1), "VALID"), x, w)
  want = _grads(lambda a, b: lax.conv_general_dilated(a, b, (2, 1), "VALID"),
                x, w)
  _assert_exact(got, want)


def test_missing_window_strides_or_padding_is_a_type_error():
  x, w = _operands()
  conv = lv.compressed_conv()
  with pytest.raises(TypeError, match="padding"):
    conv(x, w, (1, 1))


@pytest.fixture
def spy_weight_grad(monkeypatch):
  """Counts calls of conv_rule.weight_grad (the fast single-conv backward)."""
  calls = []
  real = conv_rule.weight_grad

  def spy(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(conv_rule, "weight_grad", spy)
  return calls


def test_decorator_on_single_conv_takes_fast_path(spy_weight_grad):
  @lv.compressed_conv(method="svd", eps=1.0, on_overflow="error")
  def my_conv(x, w):
    return lax.conv_general_dilated(x, w, (2, 2), "VALID",
                                    dimension_numbers=DN)

  x, w = _operands(seed=2)
  got = _grads(my_conv, x, w)
  assert spy_weight_grad, "a single conv should use conv_rule's backward"
  want = _grads(lambda a, b: lax.conv_general_dilated(
      a, b, (2, 2), "VALID", dimension_numbers=DN), x, w)
  _assert_exact(got, want)
  assert my_conv.__name__ == "my_conv"
  assert isinstance(my_conv.method, lv.methods.Svd)


def test_decorator_with_eps_below_one_matches_drop_in(spy_weight_grad):
  @lv.compressed_conv(method="svd", eps=0.8, on_overflow="ignore")
  def my_conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                    dimension_numbers=DN)

  x, w = _operands((6, 7, 7, 4), seed=3)
  got = _grads(my_conv, x, w)
  assert spy_weight_grad
  drop_in = lv.compressed_conv(method="svd", eps=0.8, on_overflow="ignore")
  want = _grads(lambda a, b: drop_in(a, b, **KW), x, w)
  _assert_exact(got, want, tol=1e-6)
  y, stats = my_conv.with_stats(x, w)
  assert stats.method == "svd" and stats.shape == x.shape


def test_decorator_on_non_conv_function_takes_generic_path(spy_weight_grad):
  @lv.compressed_conv(method="hosvd", eps=1.0, on_overflow="error")
  def scaled(x, w):
    return 2.0 * lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                          dimension_numbers=DN)

  x, w = _operands(seed=4)
  got = _grads(scaled, x, w)
  assert not spy_weight_grad, "not a single conv: the generic backward"
  want = _grads(lambda a, b: 2.0 * _lax_conv(a, b), x, w)
  _assert_exact(got, want)


def test_generic_path_eps_below_one_input_grad_exact():
  @lv.compressed_conv(method="hosvd", eps=0.6, on_overflow="ignore")
  def two_convs(x, w):  # linear in x and in w, but not one conv
    return (lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=DN)
            - lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                       dimension_numbers=DN).mean())

  def exact(x, w):
    return (_lax_conv(x, w) - lax.conv_general_dilated(
        x, w, (2, 2), "SAME", dimension_numbers=DN).mean())

  x, w = _operands(seed=5)
  got, want = _grads(two_convs, x, w), _grads(exact, x, w)
  assert _rel_err(got[0], want[0]) <= 1e-6
  assert _rel_err(got[1], want[1]) <= 1e-5
  assert _rel_err(got[2], want[2]) > 1e-3  # approximate ...
  # ... and exactly the weight gradient at the rebuilt activation.
  capacity = two_convs.method.capacity(x.shape)
  res, _ = decompositions.tucker_compress(x, capacity, 0.6, "hosvd")
  at_rebuilt = _grads(exact, res.reconstruct(), w)
  assert _rel_err(got[2], at_rebuilt[2]) <= 1e-5


def test_function_form_and_extra_arguments(spy_weight_grad):
  def strided(x, w, strides, padding="VALID"):
    return lax.conv_general_dilated(x, w, strides, padding,
                                    dimension_numbers=DN)

  wrapped = lv.compressed_conv(strided, method="hosvd", eps=1.0,
                               on_overflow="error")
  x, w = _operands((2, 9, 9, 4), seed=6)
  got = _grads(lambda a, b: wrapped(a, b, (2, 1), padding="SAME"), x, w)
  assert spy_weight_grad
  want = _grads(lambda a, b: strided(a, b, (2, 1), "SAME"), x, w)
  _assert_exact(got, want)
  # CompressedConv can decorate too.
  conv = lv.compressed_conv(eps=1.0)
  assert isinstance(conv, lv.CompressedConv)
  assert conv(strided).method == conv.method


# -------------------------------------------------------- transforms ---


def test_grad_and_value_and_grad_under_jit():
  x, w = _operands(seed=7)
  conv = lv.compressed_conv(eps=1.0, on_overflow="error")
  loss = lambda w, x: jnp.sum(jnp.sin(conv(x, w, **KW)))
  loss_lax = lambda w, x: jnp.sum(jnp.sin(_lax_conv(x, w)))
  g = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x)
  v, g2 = jax.jit(jax.value_and_grad(loss))(w, x)
  v_want, g_want = jax.value_and_grad(loss_lax, argnums=(0, 1))(w, x)
  assert float(v) == pytest.approx(float(v_want), rel=1e-6)
  assert _rel_err(g[0], g_want[0]) <= 1e-5
  assert _rel_err(g[1], g_want[1]) <= 1e-5
  assert _rel_err(g2, g_want[0]) <= 1e-5


def test_vmap_decomposes_per_example():
  x, w = _operands((4, 6, 6, 3), (3, 3, 3, 2), seed=8)
  conv = lv.compressed_conv(method="hosvd", eps=0.7, on_overflow="ignore")

  def per_example(w, xi):
    y, stats = conv.with_stats(xi[None], w, **KW)
    return jnp.sum(jnp.cos(y)), stats

  grad = jax.grad(per_example, has_aux=True)
  g_vmap, stats = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(w, x)
  assert g_vmap.shape == (4,) + w.shape
  assert stats.needed_ranks.shape == (4, 4)
  for i in range(x.shape[0]):
    g_i, stats_i = grad(w, x[i])
    assert _rel_err(g_vmap[i], g_i) <= 1e-5
    np.testing.assert_array_equal(stats.needed_ranks[i], stats_i.needed_ranks)
  # One example: batch rank 1, the other modes truncated per example.
  assert np.all(np.asarray(stats.needed_ranks)[:, 0] == 1)


@pytest.mark.parametrize("eps", [1.0, 0.7])
def test_checkpoint_gives_the_same_gradients(eps):
  x, w1 = _operands((3, 6, 6, 4), (3, 3, 4, 4), seed=9)
  _, w2 = _operands((3, 6, 6, 4), (3, 3, 4, 4), seed=10)
  conv = lv.compressed_conv(eps=eps, on_overflow="ignore")

  def block(x, w):
    return lv.relu(conv(x, w, **KW))

  def loss(ws, x, blk):
    for w in ws:
      x = blk(x, w)
    return jnp.sum(x ** 2)

  g = jax.jit(jax.grad(loss), static_argnums=2)((w1, w2), x, block)
  g_ckpt = jax.jit(jax.grad(loss), static_argnums=2)(
      (w1, w2), x, jax.checkpoint(block))
  for a, b in zip(g, g_ckpt, strict=True):
    assert _rel_err(b, a) <= 1e-5
  if eps == 1.0:
    g_lax = jax.grad(loss)((w1, w2), x, lambda x, w: jax.nn.relu(
        _lax_conv(x, w)))
    for a, b in zip(g, g_lax, strict=True):
      assert _rel_err(a, b) <= 1e-4


def test_dense_under_jit_vmap_and_grad():
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((4, 3, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
  dn = (((1,), (0,)), ((), ()))  # per example: [T, F] x [F, O]
  dense = lv.compressed_dense(eps=1.0, on_overflow="error")
  loss = lambda w, x: jnp.sum(jnp.tanh(dense(x, w, dn)))
  loss_lax = lambda w, x: jnp.sum(jnp.tanh(lax.dot_general(x, w, dn)))
  g = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, x)
  g_want = jax.vmap(jax.grad(loss_lax), in_axes=(None, 0))(w, x)
  assert _rel_err(g, g_want) <= 1e-5


# -------------------------------------------------------------- errors ---


@pytest.mark.parametrize("eps", [0, -0.5, 1.5, float("nan"), True])
@pytest.mark.parametrize("make", [lv.compressed_conv, lv.compressed_dense],
                         ids=["conv", "dense"])
def test_bad_eps_raises_value_error(make, eps):
  with pytest.raises(ValueError, match="eps"):
    make(eps=eps)


@pytest.mark.parametrize("make", [lv.compressed_conv, lv.compressed_dense],
                         ids=["conv", "dense"])
def test_unknown_method_raises_value_error(make):
  with pytest.raises(ValueError, match="method"):
    make(method="tucker2")


@pytest.mark.parametrize("x_dtype,w_dtype,name", [
    (jnp.int32, jnp.float32, "lhs"), (jnp.float32, jnp.int8, "rhs"),
    (jnp.uint8, jnp.float32, "lhs")])
def test_integer_operands_raise_type_error(x_dtype, w_dtype, name):
  x = jnp.ones((2, 5, 5, 3), x_dtype)
  w = jnp.ones((3, 3, 3, 4), w_dtype)
  with pytest.raises(TypeError, match=name):
    lv.compressed_conv()(x, w, **KW)


def test_integer_operand_of_decorated_function_raises_type_error():
  wrapped = lv.compressed_conv(lambda x, w: 2 * _lax_conv(x, w))
  with pytest.raises(TypeError, match="x"):
    wrapped(jnp.ones((2, 5, 5, 3), jnp.int32), jnp.ones((3, 3, 3, 4)))


@pytest.mark.parametrize("x_shape,w_shape,kw", [
    ((2, 5, 5, 3), (3, 3, 4, 4), {}),              # channels differ
    ((2, 5, 5, 3), (3, 3, 4), {}),                 # rank differs
    ((2, 5, 5, 6), (3, 3, 3, 4), dict(feature_group_count=4)),
    ((2, 5, 5, 3), (3, 3, 3, 4), dict(feature_group_count=0)),
    ((3, 5, 5, 3), (3, 3, 3, 4), dict(batch_group_count=2)),
    ((2, 5, 5, 3), (3, 3, 3, 4),
     dict(dimension_numbers=("NHWC", "HWIO", "NHW"))),
])
def test_mismatched_shapes_raise_value_error(x_shape, w_shape, kw):
  x, w = jnp.ones(x_shape), jnp.ones(w_shape)
  with pytest.raises(ValueError):
    lv.compressed_conv()(x, w, **dict(KW, **kw))


@pytest.mark.parametrize("method", ["hosvd", "svd"])
def test_empty_output_like_lax(method):
  """A kernel larger than the input (VALID): lax gives an empty output."""
  x, w = _operands((2, 5, 5, 3), (7, 7, 3, 4), seed=23)
  kw = dict(KW, padding="VALID")
  conv = lv.compressed_conv(method=method, eps=0.9, on_overflow="ignore")
  got = _grads(lambda a, b: conv(a, b, **kw), x, w)
  want = _grads(lambda a, b: _lax_conv(a, b, **kw), x, w)
  assert got[0].shape == want[0].shape == (2, 0, 0, 4)
  for a, b in zip(got, want, strict=True):
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("strides", [(0, 1), (1,), (1, 1, 1), (1.5, 1),
                                     (-1, 1), (True, 1)])
def test_bad_window_strides_raise_value_error(strides):
  x, w = _operands()
  with pytest.raises(ValueError, match="window_strides"):
    lv.compressed_conv()(x, w, **dict(KW, window_strides=strides))


@pytest.mark.parametrize("padding", ["FULL", "", ((1, 1),), ((1,), (1,)),
                                     ((1, 1, 1), (1, 1)), 3,
                                     (("a", 1), (1, 1))])
def test_bad_padding_raises_value_error(padding):
  x, w = _operands()
  with pytest.raises(ValueError, match="padding"):
    lv.compressed_conv()(x, w, **dict(KW, padding=padding))


def test_string_padding_with_lhs_dilation_raises_value_error():
  x, w = _operands()
  with pytest.raises(ValueError, match="lhs_dilation"):
    lv.compressed_conv()(x, w, **dict(KW, lhs_dilation=(2, 2)))


# ---------------------------------------------- degenerate activations ---


@pytest.mark.parametrize("method", ["hosvd", "svd"])
@pytest.mark.parametrize("eps", [0.5, 0.9, 1.0])
def test_all_zero_activation(method, eps):
  _, w = _operands()
  x = jnp.zeros((3, 7, 7, 4))
  conv = lv.compressed_conv(method=method, eps=eps, on_overflow="error")
  got = _grads(lambda a, b: conv(a, b, **KW), x, w)
  want = _grads(_lax_conv, x, w)
  for a in got:
    assert np.all(np.isfinite(np.asarray(a)))
  np.testing.assert_array_equal(got[0], 0.0)
  np.testing.assert_array_equal(got[2], 0.0)  # exact: x = 0
  assert _rel_err(got[1], want[1]) <= 1e-6


@pytest.mark.parametrize("method", ["hosvd", "svd"])
def test_batch_of_one(method):
  x, w = _operands((1, 7, 7, 4), seed=12)
  conv = lv.compressed_conv(method=method, eps=0.8, on_overflow="ignore")
  got = _grads(lambda a, b: conv(a, b, **KW), x, w)
  want = _grads(_lax_conv, x, w)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in got)
  assert _rel_err(got[1], want[1]) <= 1e-6
  if method == "svd":  # only the batch mode is compressed: rank 1 is exact
    assert _rel_err(got[2], want[2]) <= 1e-5


@pytest.mark.parametrize("method", ["hosvd", "svd"])
def test_rank_one_batch(method):
  one, w = _operands((1, 7, 7, 4), seed=13)
  x = jnp.tile(one, (5, 1, 1, 1))  # every example the same
  conv = lv.compressed_conv(method=method, eps=0.5, on_overflow="error")
  got = _grads(lambda a, b: conv(a, b, **KW), x, w)
  want = _grads(_lax_conv, x, w)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in got)
  assert _rel_err(got[1], want[1]) <= 1e-6
  _, stats = conv.with_stats(x, w, **KW)
  assert int(stats.needed_ranks[0]) == 1
  if method == "svd":
    assert _rel_err(got[2], want[2]) <= 1e-5


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", ["hosvd", "svd"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_non_finite_element_behaves_like_lax(bad, method, jit):
  x, w = _operands(seed=14)
  x = x.at[1, 3, 2, 0].set(bad)
  conv = lv.compressed_conv(method=method, eps=0.9, on_overflow="ignore")
  got = _grads(lambda a, b: conv(a, b, **KW), x, w, jit=jit)
  want = _grads(_lax_conv, x, w, jit=jit)
  # Forward: NaN / ±Inf exactly where lax has them, equal elsewhere.
  y, y_want = np.asarray(got[0]), np.asarray(want[0])
  np.testing.assert_array_equal(np.isnan(y), np.isnan(y_want))
  np.testing.assert_array_equal(np.isposinf(y), np.isposinf(y_want))
  np.testing.assert_array_equal(np.isneginf(y), np.isneginf(y_want))
  finite = np.isfinite(y_want)
  assert _rel_err(y[finite], y_want[finite]) <= 1e-6
  # The input gradient does not read x: finite and exact, as lax's.
  assert np.all(np.isfinite(np.asarray(got[1])))
  assert _rel_err(got[1], want[1]) <= 1e-6
  # The weight gradient is not finite wherever lax's is not: the bad value
  # the input carried is not hidden. (It spreads further: one NaN poisons
  # every factor of the decomposition, so all of dW is non-finite.)
  assert got[2].shape == w.shape
  bad_lax = ~np.isfinite(np.asarray(want[2]))
  assert bad_lax.any()
  assert not np.isfinite(np.asarray(got[2]))[bad_lax].any()
  _, stats = conv.with_stats(x, w, **KW)
  assert np.all(np.isnan(np.asarray(stats.kept_energy)[
      [a for a, c in enumerate(stats.capacity) if c is not None]]))


@pytest.mark.parametrize("method", ["hosvd", "svd"])
@pytest.mark.parametrize("kind", ["constant", "one_hot", "random_1e-6",
                                  "random_1e6"])
def test_finite_input_gives_finite_weight_grad(kind, method):
  """Constant, one-hot, small and large activations: finite and sensible."""
  base, w = _operands(seed=24)
  x = {"constant": jnp.full(base.shape, 3.0),
       "one_hot": jnp.zeros(base.shape).at[0, 0, 0, 0].set(1.0),
       "random_1e-6": 1e-6 * base, "random_1e6": 1e6 * base}[kind]
  conv = lv.compressed_conv(method=method, eps=0.9, on_overflow="ignore")
  _, dx, dw = _grads(lambda a, b: conv(a, b, **KW), x, w)
  _, dx_want, dw_want = _grads(_lax_conv, x, w)
  assert np.all(np.isfinite(np.asarray(dw)))
  assert _rel_err(dx, dx_want) <= 1e-6
  if kind in ("constant", "one_hot"):  # rank one in every mode: exact
    assert _rel_err(dw, dw_want) <= 1e-5
  else:  # scale-equivariant: the same relative error as at unit scale
    _, _, dw_unit = _grads(lambda a, b: conv(a, b, **KW), base, w)
    scale = 1e-6 if kind == "random_1e-6" else 1e6
    assert _rel_err(dw, scale * np.asarray(dw_unit, np.float64)) <= 1e-4


# The mode Grams square the entries (float32 overflows above ~1e18 and
# underflows below ~1e-19); the activation is scaled by a power of two first.
@pytest.mark.parametrize("scale", [1e18, 1e-20])
def test_weight_grad_is_scale_equivariant_at_extreme_scales(scale):
  base = jnp.ones((3, 7, 7, 4)).at[0, 1, 2, 3].set(-1.0)
  _, w = _operands(seed=25)
  conv = lv.compressed_conv(method="hosvd", eps=0.9, on_overflow="ignore")
  f = lambda a, b: conv(a, b, **KW)
  _, _, dw = _grads(f, scale * base, w)
  _, _, dw_unit = _grads(f, base, w)
  assert np.all(np.isfinite(np.asarray(dw)))
  assert _rel_err(dw, scale * np.asarray(dw_unit, np.float64)) <= 1e-4


# ------------------------------------------------------------ overflow ---


def _overflowing(on_overflow, jit):
  x, w = _operands((4, 6, 6, 3), (3, 3, 3, 2), seed=15)
  conv = lv.compressed_conv(eps=0.99, ranks=1, on_overflow=on_overflow)
  f = lambda a, b: conv(a, b, **KW)
  f = jax.jit(f) if jit else f
  y = f(x, w)
  jax.block_until_ready(y)
  jax.effects_barrier()
  return y


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_overflow_warn(jit):
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    _overflowing("warn", jit)
  hits = [r for r in rec if issubclass(r.category, lv.RankOverflowWarning)]
  assert hits, [str(r.message) for r in rec]
  assert "capacity" in str(hits[0].message)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_overflow_error(jit):
  with pytest.raises(Exception, match="capacity"):
    _overflowing("error", jit)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_overflow_ignore_is_silent(jit):
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    _overflowing("ignore", jit)
  assert not [r for r in rec if issubclass(r.category, lv.RankOverflowWarning)]


@pytest.mark.parametrize("make,args", [
    (lv.compressed_conv, ((2, 3, 3, 32), (1, 1, 32, 4))),   # C > N·H·W
    (lv.compressed_dense, ((4, 16), (16, 3))),                # F > N
    (lv.compressed_conv, ((3, 7, 7, 4), (3, 3, 4, 5))),
])
def test_no_overflow_reported_at_eps1(make, args):
  """ε = 1 with the default capacity never overflows (dual-Gram shapes too)."""
  x, w = _operands(*args, seed=16)
  op = make(eps=1.0, on_overflow="warn")
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    if make is lv.compressed_conv:
      y, stats = op.with_stats(x, w, **KW)
    else:
      y, stats = op.with_stats(x, w, (((1,), (0,)), ((), ())))
    jax.block_until_ready(y)
    jax.effects_barrier()
  assert not bool(stats.overflow), stats.needed_ranks
  assert not [r for r in rec if issubclass(r.category, lv.RankOverflowWarning)]


# --------------------------------------------------------------- stats ---


@pytest.mark.parametrize("method", ["hosvd", "svd"])
@pytest.mark.parametrize("eps", [0.5, 0.9, 0.99])
def test_stats_fields(method, eps):
  x, w = _operands((6, 8, 8, 5), (3, 3, 5, 4), seed=17)
  conv = lv.compressed_conv(method=method, eps=eps, rank_fraction=0.5,
                            on_overflow="ignore")
  y, stats = jax.jit(lambda a, b: conv.with_stats(a, b, **KW))(x, w)
  np.testing.assert_allclose(y, _lax_conv(x, w), rtol=1e-5, atol=1e-5)
  cap = stats.capacity
  assert stats.shape == x.shape and stats.method == method
  assert cap == lv.methods.resolve(method, eps=eps).capacity(
      x.shape)
  needed = np.asarray(stats.needed_ranks)
  kept = np.asarray(stats.kept_ranks)
  energy = np.asarray(stats.kept_energy)
  assert np.all(needed >= 1) and np.all(needed <= np.asarray(x.shape))
  for a, c in enumerate(cap):
    if c is None:
      assert kept[a] == needed[a] == x.shape[a] and energy[a] == 1.0
    else:
      assert kept[a] == min(needed[a], c)
  overflow = bool(stats.overflow)
  assert overflow == bool(np.any(needed > kept))
  for a, c in enumerate(cap):   # per mode, overflowed or not
    if c is not None and kept[a] == needed[a]:
      assert energy[a] >= eps - 1e-5, (a, energy, needed, cap)
    elif c is not None:          # fewer than the fewest reaching eps
      assert energy[a] < eps, (a, energy, needed, cap)
  assert stats.residual_nbytes < stats.activation_nbytes
  assert stats.itemsize == 4


def test_method_none_saves_the_activation_and_is_exact():
  x, w = _operands(seed=18)
  conv = lv.compressed_conv(method="none")
  got = _grads(lambda a, b: conv(a, b, **KW), x, w)
  _assert_exact(got, _grads(_lax_conv, x, w), tol=0.0)
  _, stats = conv.with_stats(x, w, **KW)
  np.testing.assert_array_equal(stats.needed_ranks, x.shape)
  assert not bool(stats.overflow)
  assert stats.residual_nbytes == stats.activation_nbytes
  dense = lv.compressed_dense(method="none")
  xd, wd = _operands((4, 6), (6, 3), seed=19)
  dn = (((1,), (0,)), ((), ()))
  _assert_exact(_grads(lambda a, b: dense(a, b, dn), xd, wd),
                _grads(lambda a, b: lax.dot_general(a, b, dn), xd, wd),
                tol=0.0)


# ------------------------------------------------------ natural images ---


@functools.lru_cache(maxsize=1)
def _natural_batch(n=8, size=32, seed=0):
  """Random 32×32 crops of scikit-image's photos, downscaled 4×, centred."""
  photos = [skimage.data.astronaut(), skimage.data.coffee(),
            skimage.data.chelsea()]
  small = []
  for im in photos:
    h, w = im.shape[0] // 4 * 4, im.shape[1] // 4 * 4
    im = im[:h, :w, :3].astype(np.float32) / 255.0
    small.append(im.reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3)))
  rng = np.random.default_rng(seed)
  crops = []
  for i in range(n):
    im = small[i % len(small)]
    r = rng.integers(0, im.shape[0] - size + 1)
    c = rng.integers(0, im.shape[1] - size + 1)
    crops.append(im[r:r + size, c:c + size])
  x = np.stack(crops)
  return x - x.mean(axis=(0, 1, 2))


def test_weight_grad_error_on_natural_images_falls_with_eps():
  x = jnp.asarray(_natural_batch())
  rng = np.random.default_rng(20)
  w1 = jnp.asarray(rng.standard_normal((3, 3, 3, 8)) / math.sqrt(27),
                   jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((3, 3, 8, 8)) / math.sqrt(72),
                   jnp.float32)
  act = jax.nn.relu(_lax_conv(x, w1))  # [8, 32, 32, 8], a real activation
  assert act.shape == (8, 32, 32, 8)
  g = _lax_conv(act, w2)  # the cotangent of the loss 0.5 * ||conv(act)||²

  def weight_grad(conv):
    return jax.jit(lambda a, w, g: jax.vjp(
        lambda w: conv(a, w, **KW), w)[1](g)[0])(act, w2, g)

  exact = np.asarray(weight_grad(lax.conv_general_dilated), np.float64)
  errors, needed = [], []
  for eps in [0.5, 0.7, 0.9, 0.99]:
    conv = lv.compressed_conv(method="hosvd", eps=eps, ranks=act.shape,
                              on_overflow="error")
    dw = np.asarray(weight_grad(conv), np.float64)
    errors.append(np.linalg.norm(dw - exact) / np.linalg.norm(exact))
    _, stats = conv.with_stats(act, w2, **KW)
    needed.append(np.asarray(stats.needed_ranks))
  # ε decides: more components are kept as it rises ...
  for a, b in itertools.pairwise(needed):
    assert np.all(b >= a), needed
  assert np.any(needed[0] < np.asarray(act.shape))  # ε = 0.5 truncates
  # ... and the error falls (a little slack), ending small.
  for a, b in itertools.pairwise(errors):
    assert b <= a * 1.05 + 1e-4, errors
  assert errors[0] > 0.2, errors   # seen: 0.45, 0.18, 0.064, 0.008
  assert errors[-1] < 0.02, errors
  assert errors[-1] < errors[0] / 10, errors


@pytest.mark.parametrize("method", ["hosvd", "svd"])
def test_exactly_low_rank_activation_gives_exact_weight_grad(method):
  shape, ranks = (6, 7, 7, 5), (2, 3, 3, 2)
  rng = np.random.default_rng(21)
  x = rng.standard_normal(ranks)
  for axis, (n, r) in enumerate(zip(shape, ranks, strict=True)):
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    x = np.moveaxis(np.tensordot(x, q, axes=([axis], [1])), -1, axis)
  x = jnp.asarray(x, jnp.float32)
  _, w = _operands(shape, (3, 3, 5, 4), seed=22)
  conv = lv.compressed_conv(method=method, eps=0.999, rank_fraction=1.0,
                            on_overflow="error")
  got = _grads(lambda a, b: conv(a, b, **KW), x, w)
  want = _grads(_lax_conv, x, w)
  _assert_exact(got, want, tol=1e-4)
  _, stats = conv.with_stats(x, w, **KW)
  want_ranks = ranks if method == "hosvd" else (ranks[0],) + shape[1:]
  np.testing.assert_array_equal(stats.needed_ranks, want_ranks)
  # At the needed ranks the residual is smaller than the activation.
  assert stats.analytic_nbytes() < stats.activation_nbytes


# ------------------------------------------------------ empty operands ---

_ALL_METHODS = ["none", "hosvd", "svd", "quant", "gradfilter", "checkpoint",
                "asi"]


@pytest.mark.parametrize("method", _ALL_METHODS)
@pytest.mark.parametrize("shape", [(0, 5, 5, 3), (2, 5, 5, 0)],
                         ids=["empty_batch", "no_channels"])
def test_empty_operands_give_lax_gradients(method, shape):
  """hosvd/svd/dense failed in a max, quant in a min, gradfilter by zero."""
  x, w = jnp.ones(shape), jnp.ones((3, 3, shape[-1], 2))
  conv = lv.compressed_conv(method=method)
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN)
  if method == "asi":
    state = conv.init_state(x, w, **kw)
    f = lambda x, w: conv.with_state(x, w, **kw, state=state)[0]
  else:
    f = lambda x, w: conv(x, w, **kw)
  got = _grads(f, x, w)
  want = _grads(lambda x, w: lax.conv_general_dilated(x, w, **kw), x, w)
  _assert_exact(got, want)


@pytest.mark.parametrize("method", ["hosvd", "svd", "quant"])
def test_empty_dense_batch_gives_lax_gradients(method):
  d = lv.compressed_dense(method=method)
  dn = (((1,), (0,)), ((), ()))
  x, w = jnp.ones((0, 5)), jnp.ones((5, 3))
  got = _grads(lambda x, w: d(x, w, dn), x, w)
  want = _grads(lambda x, w: lax.dot_general(x, w, dn), x, w)
  _assert_exact(got, want)
  _, stats = d.with_stats(x, w, dn)
  assert stats.residual_nbytes == 0
