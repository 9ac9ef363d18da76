"""Tests for lowrank_vjp._src.ops.bilinear: a user's bilinear fn as an op.

``BilinearSpec``'s gradients are the transposes of the function itself, so
they must equal ``jax.vjp`` of the function; decorated with
``lv.compressed_conv(method=...)`` a function that is not a single
convolution must, at ε = 1, have JAX's own gradients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import lowrank_vjp as lv
from lowrank_vjp._src.ops import bilinear
from lowrank_vjp._src.ops import conv as conv_lib

TOL = {"float32": 1e-5, "float64": 1e-12}


def _conv_scaled(x, w):
  return 2.0 * lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


# (name, fn, lhs shape, rhs shape): linear in x and in w, none of them a
# single lax.conv_general_dilated of (x, w).
FUNCTIONS = [
    ("matmul", lambda x, w: jnp.einsum("nf,fo->no", x, w), (6, 5), (5, 3)),
    ("tokens", lambda x, w: jnp.einsum("ntf,fo->nto", x, w), (3, 4, 5),
     (5, 2)),
    ("two_terms", lambda x, w: 2.0 * (x @ w) - x @ w[::-1], (4, 6), (6, 6)),
    ("outer_sum", lambda x, w: jnp.einsum("nij,jk->nik", x, w).sum(1),
     (3, 4, 5), (5, 2)),
    ("transposed_weight", lambda x, w: jnp.einsum("nf,of->no", x, w), (5, 4),
     (3, 4)),
    ("scaled_conv", _conv_scaled, (2, 6, 6, 3), (3, 3, 3, 4)),
]
IDS = [f[0] for f in FUNCTIONS]


def _operands(lhs_shape, rhs_shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal(lhs_shape), dtype),
          jnp.asarray(rng.standard_normal(rhs_shape), dtype))


def _rel_err(actual, expected) -> float:
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
  return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


# ------------------------------------------------------ the op itself ---


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,fn,lhs_shape,rhs_shape", FUNCTIONS, ids=IDS)
def test_grads_equal_jax_vjp_of_the_function(name, fn, lhs_shape, rhs_shape,
                                             dtype, jit):
  with jax.enable_x64(dtype == "float64"):
    x, w = _operands(lhs_shape, rhs_shape, dtype)
    other = _operands(lhs_shape, rhs_shape, dtype, seed=1)[0]
    spec = bilinear.BilinearSpec(fn, x.shape, x.dtype, w.shape, w.dtype)
    y, vjp = jax.vjp(fn, x, w)
    g = jnp.asarray(np.random.default_rng(2).standard_normal(y.shape), dtype)
    want_dx = vjp(g)[0]
    want_dw = jax.vjp(fn, other, w)[1](g)[1]
    input_grad = jax.jit(spec.input_grad) if jit else spec.input_grad
    weight_grad = jax.jit(spec.weight_grad) if jit else spec.weight_grad
    dx, dw = input_grad(w, g), weight_grad(other, g)
    np.testing.assert_array_equal(spec.apply(x, w), y)
    assert spec.out_shape() == y.shape and spec.out_dtype() == y.dtype
  assert dx.shape == x.shape and dx.dtype == x.dtype
  assert dw.shape == w.shape and dw.dtype == w.dtype
  assert _rel_err(dx, want_dx) <= TOL[dtype], name
  assert _rel_err(dw, want_dw) <= TOL[dtype], name


def test_spec_fields_axes_and_hash():
  fn = FUNCTIONS[1][1]
  x, w = _operands((3, 4, 5), (5, 2), "float32")
  spec = bilinear.bilinear_spec(fn, x, w)
  assert spec == bilinear.BilinearSpec(fn, (3, 4, 5), jnp.float32, (5, 2),
                                       jnp.float32)
  assert hash(spec) == hash(bilinear.bilinear_spec(fn, jnp.zeros_like(x), w))
  assert spec.kind == "bilinear"
  assert (spec.batch_axis, spec.channel_axis) == (0, 2)  # batch first, C last
  assert spec.out_dtype() == jnp.float32
  mixed = bilinear.bilinear_spec(fn, x.astype(jnp.bfloat16), w)
  assert mixed.out_dtype() == jnp.float32 and mixed.lhs_dtype == jnp.bfloat16


@pytest.mark.parametrize("lhs_dtype,rhs_dtype,name", [
    (jnp.int32, jnp.float32, "x"), (jnp.float32, jnp.int32, "w"),
    (jnp.bool_, jnp.float32, "x")])
def test_non_float_operands_raise_type_error(lhs_dtype, rhs_dtype, name):
  x, w = jnp.ones((4, 5), lhs_dtype), jnp.ones((5, 3), rhs_dtype)
  with pytest.raises(TypeError, match=f"{name} must have a floating dtype"):
    bilinear.bilinear_spec(lambda x, w: x @ w, x, w)
  decorated = lv.compressed_conv(lambda x, w: x @ w, method="hosvd")
  with pytest.raises(TypeError, match=name):
    decorated(x, w)


# ---------------------------------------- decorated with compressed_conv ---


EXACT_METHODS = [
    pytest.param(lv.methods.Hosvd(eps=1.0, on_overflow="error"), id="hosvd"),
    pytest.param(lv.methods.Svd(eps=1.0, on_overflow="error"), id="svd"),
    pytest.param(lv.methods.Vanilla(), id="none"),
    pytest.param(lv.methods.Checkpoint(), id="checkpoint"),
]


def _grads(f, x, w, g):
  y, vjp = jax.vjp(f, x, w)
  return (y,) + vjp(g)


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("name,fn,lhs_shape,rhs_shape", FUNCTIONS, ids=IDS)
def test_decorated_function_at_eps1_has_jax_gradients(name, fn, lhs_shape,
                                                      rhs_shape, method):
  x, w = _operands(lhs_shape, rhs_shape, "float32", seed=3)
  decorated = lv.compressed_conv(fn, method=method)
  g = jnp.asarray(np.random.default_rng(4).standard_normal(
      jax.eval_shape(fn, x, w).shape), jnp.float32)
  got = jax.jit(lambda x, w, g: _grads(decorated, x, w, g))(x, w, g)
  want = jax.jit(lambda x, w, g: _grads(fn, x, w, g))(x, w, g)
  assert _rel_err(got[0], want[0]) == 0.0, name  # the forward is fn's own
  for a, b in zip(got, want, strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert _rel_err(a, b) <= 1e-4, name


@pytest.mark.parametrize("method", ["hosvd", "svd"])
@pytest.mark.parametrize("name,fn,lhs_shape,rhs_shape",
                         [FUNCTIONS[1], FUNCTIONS[2]], ids=IDS[1:3])
def test_decorated_check_grads_float64(name, fn, lhs_shape, rhs_shape, method,
                                       x64):
  x, w = _operands(lhs_shape, rhs_shape, "float64", seed=5)
  decorated = lv.compressed_conv(fn, method=method, eps=1.0,
                                 on_overflow="error")
  check_grads(jax.jit(decorated), (x, w), order=1, modes=["rev"], atol=1e-6,
              rtol=1e-6)


@pytest.mark.parametrize("method", ["hosvd", "svd"])
def test_decorated_eps_below_one(method):
  """ε < 1: forward and input gradient exact, dW taken at the rebuilt x."""
  name, fn, lhs_shape, rhs_shape = FUNCTIONS[1]
  x, w = _operands(lhs_shape, rhs_shape, "float32", seed=6)
  m = lv.methods.resolve(method, eps=0.5, rank_fraction=1.0,
                         on_overflow="ignore")
  decorated = lv.compressed_conv(fn, method=m)
  g = jnp.asarray(np.random.default_rng(7).standard_normal((3, 4, 2)),
                  jnp.float32)
  y, dx, dw = jax.jit(lambda x, w, g: _grads(decorated, x, w, g))(x, w, g)
  _, want_dx, want_dw = _grads(fn, x, w, g)
  np.testing.assert_array_equal(y, fn(x, w))
  assert _rel_err(dx, want_dx) <= 1e-6, name
  assert _rel_err(dw, want_dw) > 1e-3      # ε < 1 took effect ...
  spec = bilinear.bilinear_spec(fn, x, w)
  res, _, _ = m.compress_for(spec, x, None)
  at_rebuilt = spec.weight_grad(res.reconstruct(dtype=x.dtype), g)
  assert _rel_err(dw, at_rebuilt) <= 1e-5  # ... as the reference says


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Recorder(lv.methods.Method):
  """Saves x as it is and records which op each call resolved to."""

  seen: list = dataclasses.field(default_factory=list, compare=False,
                                 hash=False)

  def compress(self, x):
    return x

  def decompress(self, residual, like):
    return residual

  def check_op(self, op):
    self.seen.append(type(op))


def test_a_single_conv_becomes_a_conv_spec_anything_else_bilinear():
  recorder = _Recorder()
  dn = ("NHWC", "HWIO", "NHWC")
  single = lv.compressed_conv(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=dn), method=recorder)
  scaled = lv.compressed_conv(_conv_scaled, method=recorder)
  x, w = _operands((2, 6, 6, 3), (3, 3, 3, 4), "float32")
  np.testing.assert_array_equal(single(x, w) * 2.0, scaled(x, w))
  assert recorder.seen == [conv_lib.ConvSpec, bilinear.BilinearSpec]
  # The user-defined method works on both, exact (it saves x itself).
  for f, ref in ((single, lambda x, w: _conv_scaled(x, w) / 2), (
      scaled, _conv_scaled)):
    got = jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w))), (0, 1))(x, w)
    want = jax.grad(lambda x, w, ref=ref: jnp.sum(jnp.sin(ref(x, w))),
                    (0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
      assert _rel_err(a, b) <= 1e-5


def test_decorated_with_stats_and_quant_channel_axis():
  name, fn, lhs_shape, rhs_shape = FUNCTIONS[1]
  x, w = _operands(lhs_shape, rhs_shape, "float32", seed=8)
  decorated = lv.compressed_conv(fn, method="hosvd", eps=1.0)
  y, stats = decorated.with_stats(x, w)
  np.testing.assert_array_equal(y, fn(x, w))
  assert stats.shape == lhs_shape and stats.method == "hosvd", name
  spec = bilinear.bilinear_spec(fn, x, w)
  assert lv.methods.Quant(per_channel=True).qspec(spec).channel_axis == 2
