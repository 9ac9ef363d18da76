"""The fused BN → ReLU → conv unit saving K-bit codes (layers/fused.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowrank_vjp as lv
from lowrank_vjp._src.layers import fused
from lowrank_vjp._src.ops import conv as conv_lib

DN = ("NHWC", "HWIO", "NHWC")


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
  # Stochastic rounding never crosses ReLU's threshold: the decoded mask is
  # exactly z > 0, for every bit width, on several inputs.
  for bits in (2, 4, 8):
    for seed in (2, 5):
      u, w, scale, bias = _block_inputs(seed)
      spec = conv_lib.conv_spec(u, w, (1, 1), "SAME", dimension_numbers=DN)
      bspec = fused.BlockSpec(spec, bits, True, 1e-5)
      _, saved = fused._block_fwd(bspec, u, w, scale, bias)  # pylint: disable=protected-access
      _, _, mask = fused.decode_block(bspec, saved[0], scale, bias)
      mean, var = jnp.mean(u, (0, 1, 2)), jnp.var(u, (0, 1, 2))
      z = (u - mean) * lax.rsqrt(var + 1e-5) * scale + bias
      np.testing.assert_array_equal(mask, z > 0)
      # ... and it is stochastic: other codes than nearest rounding's.
      nearest = fused._block_fwd(  # pylint: disable=protected-access
          fused.BlockSpec(spec, bits, False, 1e-5), u, w, scale, bias)[1][0]
      assert not np.array_equal(np.asarray(saved[0]), np.asarray(nearest))


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


def test_block_residual_nbytes_formula():
  u, w, _, _ = _block_inputs(0, (4, 8, 8, 4))
  spec = conv_lib.conv_spec(u, w, (1, 1), "SAME", dimension_numbers=DN)
  for bits in (2, 4, 8):
    assert fused.block_residual_nbytes(spec, bits) == (
        4 * math.ceil(u.size * bits / 32) + 4 * 4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_decode_block_mask_is_exact(bits):
  """The codes decode to ReLU's mask exactly and to x̂ within a bin."""
  u, w, scale, bias = _block_inputs(3)
  spec = conv_lib.conv_spec(u, w, (1, 1), "SAME", dimension_numbers=DN)
  bspec = fused.BlockSpec(spec, bits, False, 1e-5)
  _, saved = jax.jit(lambda *a: fused._block_fwd(bspec, *a))(  # pylint: disable=protected-access
      u, w, scale, bias)
  words = saved[0]
  assert words.dtype == jnp.uint32
  assert words.shape == (math.ceil(u.size * bits / 32),)
  xhat, a, mask = fused.decode_block(bspec, words, scale, bias)
  mean, var = jnp.mean(u, (0, 1, 2)), jnp.var(u, (0, 1, 2))
  want_xhat = (u - mean) * lax.rsqrt(var + 1e-5)
  z = want_xhat * scale + bias
  np.testing.assert_array_equal(mask, z > 0)
  width = 6.0 / 2**bits
  # Inside the coded range (2**bits bins, ReLU's threshold on the edge of
  # bin `shift`) x̂ is within half a bin ...
  a_s = jnp.abs(scale)
  shift = jnp.clip(2 ** (bits - 1) - jnp.floor(bias / a_s / width), 1,
                   2**bits - 1)
  pos = z / a_s / width + shift
  inside = (pos > 0) & (pos <= 2**bits)
  assert float(jnp.mean(inside)) > 0.9
  err = jnp.abs(xhat - want_xhat)
  assert bool(jnp.all(jnp.where(inside, err <= 0.5 * width + 1e-5, True)))
  # ... and the ReLU output is the decoded value where the mask is set.
  np.testing.assert_allclose(a, jnp.where(mask, jnp.abs(scale) * (
      xhat * jnp.sign(scale) + bias / jnp.abs(scale)), 0.0), rtol=1e-5,
                             atol=1e-5)
