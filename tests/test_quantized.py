"""method="quant" and the fused BN → ReLU → conv unit (_src/quantized.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowrank_vjp as lv
from lowrank_vjp._src.tensor import packing as packing
from lowrank_vjp._src.methods import quant as quantized

DN = ("NHWC", "HWIO", "NHWC")


def _x(shape=(4, 6, 6, 5), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * 2.0 + 0.5


# ------------------------------------------------------------- codes ---


def _decoded(x, qspec):
  return jax.jit(lambda x: quantized.dequantize(
      quantized.quantize(x, qspec), x.shape, x.dtype, qspec))(x)


@pytest.mark.parametrize("bits,size", [(1, 33), (2, 7), (4, 1), (8, 100),
                                       (8, 32)])
def test_pack_roundtrip(bits, size):
  codes = jax.random.randint(jax.random.PRNGKey(size), (size,), 0, 2**bits)
  words = packing.pack(codes, bits)
  assert words.dtype == jnp.uint32
  assert words.shape == (packing.packed_words(size, bits),)
  np.testing.assert_array_equal(packing.unpack(words, bits, (size,)), codes)


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
    lv.CompressionConfig(method="quant", **kwargs)


# --------------------------------------------- fused BN → ReLU → conv ---


def _block_inputs(seed=0, shape=(4, 6, 6, 4)):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  u = jax.random.normal(k[0], shape) * 1.5 + 0.3
  w = jax.random.normal(k[1], (3, 3, shape[-1], 5)) * 0.3
  scale = jnp.array([1.0, -0.7, 2.0, 0.4])[:shape[-1]]
  bias = jnp.array([0.1, 0.3, -0.4, 0.0])[:shape[-1]]
  return u, w, scale, bias


@jax.jit
def _exact_block(u, w, scale, bias, eps=1e-5):
  mean, var = jnp.mean(u, (0, 1, 2)), jnp.var(u, (0, 1, 2))
  z = (u - mean) * lax.rsqrt(var + eps) * scale + bias
  return lax.conv_general_dilated(jax.nn.relu(z), w, (1, 1), "SAME",
                                  dimension_numbers=DN)


def _reference_block_grads(u, w, scale, bias, g, bits, eps=1e-5):
  """The paper's backward, written out in NumPy from the decoded codes."""
  u, w, scale, bias, g = (np.asarray(a, np.float64)
                          for a in (u, w, scale, bias, g))
  mean, var = u.mean((0, 1, 2)), u.var((0, 1, 2))
  inv = 1 / np.sqrt(var + eps)
  xhat = (u - mean) * inv
  z = xhat * scale + bias
  width = 6.0 / 2**bits
  a_s = np.abs(scale)
  shift = np.clip(2 ** (bits - 1) - np.floor(bias / a_s / width), 1,
                  2**bits - 1)
  codes = np.clip(np.ceil(z / (a_s * width) + shift) - 1, 0, 2**bits - 1)
  mask = codes >= shift
  w_hat = (codes - shift + 0.5) * width
  xhat_hat = np.sign(scale) * (w_hat - bias / a_s)
  a_hat = np.where(mask, w_hat * a_s, 0.0)
  np.testing.assert_array_equal(mask, z > 0)          # the mask is exact
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN)
  conv = lambda a, w: lax.conv_general_dilated(a, w, **kw)
  da, dw = (np.asarray(t, np.float64) for t in jax.jit(
      lambda a, w, g: jax.vjp(conv, a, w)[1](g))(a_hat, w, g))
  gz = np.where(mask, da, 0.0)
  dbias = gz.sum((0, 1, 2))
  dscale = (gz * xhat_hat).sum((0, 1, 2))
  gx = gz * scale
  du = inv * (gx - gx.mean((0, 1, 2)) - xhat_hat * (gx * xhat_hat).mean(
      (0, 1, 2)))
  return du, dw, dscale, dbias


@pytest.mark.parametrize("bits", [4])
def test_fused_block_matches_reference_formula(bits, x64):
  u, w, scale, bias = (jnp.asarray(a, jnp.float64) for a in _block_inputs())
  f = lambda *a: lv.bn_relu_conv(*a, (1, 1), "SAME", dimension_numbers=DN,
                                 bits=bits)[0]
  g = jax.random.normal(jax.random.PRNGKey(5), (4, 6, 6, 5), jnp.float64)
  y, grads = jax.jit(lambda a, g: (f(*a), jax.vjp(f, *a)[1](g)))(
      (u, w, scale, bias), g)
  np.testing.assert_allclose(y, _exact_block(u, w, scale, bias), rtol=1e-10)
  for ours, ref in zip(grads, _reference_block_grads(u, w, scale, bias, g,
                                                     bits), strict=True):
    np.testing.assert_allclose(ours, ref, rtol=1e-8, atol=1e-10)


def test_fused_block_is_close_to_exact_at_8_bits():
  u, w, scale, bias = _block_inputs(1, (8, 8, 8, 4))
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  ours = jax.jit(jax.grad(loss(lambda *a: lv.bn_relu_conv(
      *a, (1, 1), "SAME", dimension_numbers=DN, bits=8)[0]), (0, 1, 2, 3)))(
          u, w, scale, bias)
  exact = jax.jit(jax.grad(loss(_exact_block), (0, 1, 2, 3)))(
      u, w, scale, bias)
  for a, b in zip(ours, exact, strict=True):
    assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 0.05


def test_fused_block_statistics_and_stochastic():
  u, w, scale, bias = _block_inputs(2)
  y, mean, var = lv.bn_relu_conv(u, w, scale, bias, (1, 1), "SAME",
                                 dimension_numbers=DN, bits=4,
                                 stochastic=True)
  np.testing.assert_allclose(mean, jnp.mean(u, (0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(var, jnp.var(u, (0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(y, _exact_block(u, w, scale, bias), rtol=1e-5,
                             atol=1e-5)
  g = jax.jit(jax.grad(lambda u: jnp.sum(lv.bn_relu_conv(
      u, w, scale, bias, (1, 1), "SAME", dimension_numbers=DN, bits=4,
      stochastic=True)[0])))(u)
  assert bool(jnp.all(jnp.isfinite(g)))


def test_fused_block_keeps_only_codes_and_statistics():
  u, w, scale, bias = _block_inputs(0, (4, 8, 8, 4))
  for bits in (8, 4):
    f = lambda u, w, s, b, bits=bits: lv.bn_relu_conv(
        u, w, s, b, (1, 1), "SAME", dimension_numbers=DN, bits=bits)[0]
    params = 4 * (w.size + 2 * 4)
    expect = 4 * math.ceil(u.size * bits / 32) + 4 * 4     # codes + 1/std
    assert lv.measure.vjp_residual_bytes(f, u, w, scale, bias) == (
        expect + params)


def test_fused_block_rejects_bad_arguments():
  u, w, scale, bias = _block_inputs()
  with pytest.raises(ValueError, match="bits"):
    lv.bn_relu_conv(u, w, scale, bias, (1, 1), "SAME", dimension_numbers=DN,
                    bits=5)
  with pytest.raises(ValueError, match="scale"):
    lv.bn_relu_conv(u, w, scale[:2], bias, (1, 1), "SAME",
                    dimension_numbers=DN)

