"""method="quant": K-bit codes of the saved input (methods/quant.py).

The fused BN → ReLU → conv unit is tested in tests/layers/test_layers_fused.py,
packing in tests/tensor/test_tensor_packing.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowrank_vjp as lv
from lowrank_vjp._src.methods import quant as quantized
from lowrank_vjp._src.ops import conv as conv_lib

DN = ("NHWC", "HWIO", "NHWC")


def _x(shape=(4, 6, 6, 5), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * 2.0 + 0.5


# ------------------------------------------------------------- codes ---


def _decoded(x, qspec):
  return jax.jit(lambda x: quantized.dequantize(
      quantized.quantize(x, qspec), x.shape, x.dtype, qspec))(x)


@pytest.mark.parametrize("bits,per_channel", [(2, False), (4, True),
                                               (8, False)])
def test_quantize_error_is_half_a_bin_inside_the_range(bits, per_channel):
  x = _x()
  qspec = quantized.QuantSpec(bits, per_channel, False, 3)
  res = jax.jit(lambda x: quantized.quantize(x, qspec))(x)
  x_hat = _decoded(x, qspec)
  lo = quantized._broadcast(res.lo, 4, qspec)  # pylint: disable=protected-access
  step = quantized._broadcast(res.step, 4, qspec)  # pylint: disable=protected-access
  hi = lo + step * 2**bits
  inside = (x >= lo) & (x <= hi)
  err = jnp.abs(x_hat - x)
  assert bool(jnp.all(jnp.where(inside, err <= 0.5 * step * 1.0001, True)))
  # Outside the range the value is clipped to the first / last level.
  top = jnp.broadcast_to(hi - step / 2, x.shape)
  np.testing.assert_allclose(x_hat[x > hi], top[x > hi], rtol=1e-6)
  assert res.lo.shape == ((x.shape[3],) if per_channel else ())
  assert res.nbytes == quantized.residual_nbytes(x.shape, qspec)
  assert res.nbytes == 4 * math.ceil(x.size * bits / 32) + 8 * (
      x.shape[3] if per_channel else 1)


def test_range_is_three_sigma_clipped_to_the_data():
  x = jnp.concatenate([jnp.linspace(-1.0, 1.0, 999), jnp.array([100.0])])
  res = quantized.quantize(x, quantized.QuantSpec(8, False, False, 0))
  mean, std = float(jnp.mean(x)), float(jnp.std(x))
  np.testing.assert_allclose(res.lo, -1.0, rtol=1e-6)   # the data's min
  np.testing.assert_allclose(res.lo + 256 * res.step, mean + 3 * std,
                             rtol=1e-5)


def test_stochastic_rounding_is_unbiased():
  # A constant value between two levels: each element rounds up or down,
  # the mean of the decoded values is the value.
  # The range is [0, 1] (the data's min and max), 2-bit levels 1/8, 3/8, ...
  x = jnp.concatenate([jnp.full((20000,), 0.3), jnp.linspace(0, 1, 20000)])
  qspec = quantized.QuantSpec(2, False, True, 0)
  res = quantized.quantize(x, qspec)
  x_hat = quantized.dequantize(res, x.shape, x.dtype, qspec)[:20000]
  levels = np.unique(np.asarray(x_hat))
  assert len(levels) == 2                       # both neighbours are used
  assert abs(float(jnp.mean(x_hat)) - 0.3) < 3e-3
  nearest = quantized.dequantize(
      quantized.quantize(x, quantized.QuantSpec(2, False, False, 0)),
      x.shape, x.dtype, qspec)[:20000]
  np.testing.assert_allclose(nearest, 0.375)           # nearest is biased


# ------------------------------------------------------ conv / dense ---


def _reference_grads(x, w, g, x_hat, kw):
  """Exact input gradient, weight gradient at the decoded input."""
  conv = lambda x, w: lax.conv_general_dilated(x, w, **kw)
  return jax.jit(lambda x, w, x_hat, g: (
      jax.vjp(conv, x, w)[1](g)[0], jax.vjp(conv, x_hat, w)[1](g)[1]))(
          x, w, x_hat, g)


@pytest.mark.parametrize("bits,per_channel,stochastic,dn,strides,groups", [
    (8, False, False, ("NHWC", "HWIO", "NHWC"), (1, 1), 1),
    (4, True, False, ("NCHW", "OIHW", "NCHW"), (2, 2), 1),
    (2, False, True, ("NHWC", "HWIO", "NHWC"), (1, 2), 5)])  # depthwise
def test_conv_grads_match_reference_formula(bits, per_channel, stochastic,
                                            dn, strides, groups):
  x = _x()
  if dn[0] == "NCHW":
    x = jnp.transpose(x, (0, 3, 1, 2))
  w_shape = {("HWIO", 1): (3, 3, 5, 4), ("OIHW", 1): (4, 5, 3, 3),
             ("HWIO", 5): (3, 3, 1, 5)}[dn[1], groups]
  w = jax.random.normal(jax.random.PRNGKey(1), w_shape) * 0.3
  kw = dict(window_strides=strides, padding="SAME", dimension_numbers=dn,
            feature_group_count=groups)
  conv = lv.compressed_conv(method="quant", bits=bits,
                            per_channel=per_channel, stochastic=stochastic)
  f = lambda x, w: conv(x, w, **kw)
  g = jax.random.normal(jax.random.PRNGKey(2), jax.eval_shape(f, x, w).shape)
  y, (dx, dw) = jax.jit(lambda x, w, g: (f(x, w), jax.vjp(f, x, w)[1](g)))(
      x, w, g)
  np.testing.assert_allclose(y, lax.conv_general_dilated(x, w, **kw),
                             rtol=1e-6, atol=1e-6)
  channel_axis = dn[0].index("C")
  qspec = quantized.QuantSpec(bits, per_channel, stochastic, channel_axis)
  x_hat = _decoded(x, qspec)
  rdx, rdw = _reference_grads(x, w, g, x_hat, kw)
  np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-5)  # exact
  np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-4)


def test_weight_gradient_error_shrinks_with_bits():
  # Relative error of dW on a Gaussian input: at 8 bits it is set by the
  # few values clipped beyond 3σ (about 2 %), then by the bin width.
  x = _x((8, 8, 8, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 4))
  loss = lambda c: lambda w: jnp.sum(jnp.sin(c(x, w, (1, 1), "SAME",
                                               dimension_numbers=DN)))
  ref = jax.jit(jax.grad(loss(lax.conv_general_dilated)))(w)
  errs = []
  for bits in (8, 4):
    dw = jax.jit(jax.grad(loss(lv.compressed_conv(method="quant",
                                                  bits=bits))))(w)
    errs.append(float(jnp.linalg.norm(dw - ref) / jnp.linalg.norm(ref)))
  assert errs[0] < 0.04 and errs[1] < 0.2 and errs[0] < errs[1]


def test_dense_and_bilinear_function():
  x = _x((6, 10))
  w = jax.random.normal(jax.random.PRNGKey(3), (10, 3))
  dense = lv.compressed_dense(method="quant", bits=8, per_channel=True)
  dnums = (((1,), (0,)), ((), ()))
  dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(dense(x, w, dnums) ** 2),
                            (0, 1)))(x, w)
  x_hat = _decoded(x, quantized.QuantSpec(8, True, False, 1))
  y = x @ w
  np.testing.assert_allclose(dx, 2 * y @ w.T, rtol=1e-5)
  np.testing.assert_allclose(dw, x_hat.T @ (2 * y), rtol=1e-5)

  @lv.compressed_conv(method="quant", bits=8)
  def scaled(x, w):   # not a single convolution: the generic path
    return 2.0 * (x @ w)
  gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(scaled(x, w)), (0, 1)))(
      x, w)
  x_hat = _decoded(x, quantized.QuantSpec(8, False, False, 1))
  np.testing.assert_allclose(gx, 2 * jnp.ones((6, 3)) @ w.T, rtol=1e-6)
  np.testing.assert_allclose(gw, 2 * x_hat.T @ jnp.ones((6, 3)), rtol=1e-5)


def test_stats_and_saved_bytes_match_formula():
  x, w = _x((4, 8, 8, 6)), jnp.ones((3, 3, 6, 2))
  for bits, per_channel in ((8, False), (4, True), (2, False)):
    conv = lv.compressed_conv(method="quant", bits=bits,
                              per_channel=per_channel)
    _, stats = conv.with_stats(x, w, (1, 1), "SAME", dimension_numbers=DN)
    expect = 4 * math.ceil(x.size * bits / 32) + 8 * (6 if per_channel
                                                      else 1)
    assert stats.method == "quant" and stats.residual_nbytes == expect
    assert stats.capacity == (None,) * 4
    np.testing.assert_array_equal(stats.kept_ranks, x.shape)
    f = lambda x, w, conv=conv: conv(x, w, (1, 1), "SAME",
                                     dimension_numbers=DN)
    # jaxpr level: the packed codes, the range and the kernel only.
    assert lv.measure.vjp_residual_bytes(f, x, w) == expect + 4 * w.size


@pytest.mark.parametrize("kwargs,name", [
    (dict(bits=3), "bits"), (dict(bits=16), "bits"), (dict(bits=True), "bits"),
    (dict(per_channel=1), "per_channel"), (dict(stochastic="yes"),
                                           "stochastic")])
def test_invalid_settings_raise_naming_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    lv.compressed_conv(method="quant", **kwargs)
  with pytest.raises(ValueError, match=name):
    lv.methods.Quant(**kwargs)
  with pytest.raises(ValueError, match=name):
    lv.methods.resolve("quant", **kwargs)


def test_settings_of_other_methods_are_type_errors():
  with pytest.raises(TypeError, match="eps"):
    lv.compressed_conv(method="quant", eps=0.9)
  with pytest.raises(TypeError, match="radius"):
    lv.methods.resolve("quant", radius=2)
  assert lv.methods.resolve("quant", bits=4) == lv.methods.Quant(bits=4)


@pytest.mark.parametrize("dn,channel_axis", [
    (("NHWC", "HWIO", "NHWC"), 3), (("NCHW", "OIHW", "NCHW"), 1),
    (("HWCN", "HWIO", "NHWC"), 2)])
def test_method_apply_codes_along_the_ops_channel_axis(dn, channel_axis):
  """``Quant.apply`` is the old ``quantized.apply(spec, qspec, x, w)``."""
  x = _x()
  x = jnp.transpose(x, ["NHWC".index(a) for a in dn[0]])
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 5, 4)) * 0.3
  w = jnp.transpose(w, ["HWIO".index(a) for a in dn[1]])
  spec = conv_lib.conv_spec(x, w, (1, 1), "SAME", dimension_numbers=dn)
  assert spec.channel_axis == channel_axis
  method = lv.methods.Quant(bits=4, per_channel=True)
  assert method.qspec(spec) == quantized.QuantSpec(4, True, False,
                                                   channel_axis)
  f = lambda x, w: method.apply(spec, x, w)[0]
  g = jax.random.normal(jax.random.PRNGKey(2), spec.out_shape())
  y, (dx, dw) = jax.jit(lambda x, w, g: (f(x, w), jax.vjp(f, x, w)[1](g)))(
      x, w, g)
  np.testing.assert_array_equal(y, spec.apply(x, w))
  x_hat = _decoded(x, method.qspec(spec))
  rdx, rdw = _reference_grads(x, w, g, x_hat, dict(
      window_strides=(1, 1), padding="SAME", dimension_numbers=dn))
  np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-4)
  _, stats, state = method.apply(spec, x, w)
  assert state is None
  assert stats.residual_nbytes == quantized.residual_nbytes(
      x.shape, method.qspec(spec))


@pytest.mark.parametrize("scale", [1e-19, 1e-25, 1e-30, 1e20, 1e30])
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_weight_grad_error_does_not_depend_on_the_scale(scale, kind):
  """σ underflowed below ~1e-19: every element in one bin, 100 % error."""
  k = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k[0], (4, 8, 8, 4))
  w = jax.random.normal(k[1], (3, 3, 4, 4)) * 0.3
  g = jax.random.normal(k[2], (4, 8, 8, 4))
  dn = ("NHWC", "HWIO", "NHWC")

  def dw(x, method):
    if kind == "conv":
      conv = (lax.conv_general_dilated if method is None
              else lv.compressed_conv(method=method))
      f = lambda w: jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=dn)
                            * g)
      return jax.grad(f)(w)
    dense = (lax.dot_general if method is None
             else lv.compressed_dense(method=method))
    xd, wd = x.reshape(-1, 4), w[1, 1]
    f = lambda w: jnp.sum(dense(xd, w, (((1,), (0,)), ((), ())))
                          * g.reshape(-1, 4))
    return jax.grad(f)(wd)

  method = lv.methods.Quant(bits=8)

  def err(s):   # in units of the largest entry: norms of 1e-19s underflow
    want = dw(x0 * s, None)
    unit = jnp.max(jnp.abs(want))
    return float(jnp.linalg.norm((dw(x0 * s, method) - want) / unit)
                 / jnp.linalg.norm(want / unit))

  assert err(scale) < 0.1
  assert abs(err(scale) - err(1.0)) < 1e-3
