"""Frozen BatchNorm keeps nothing of the activation (layers/batchnorm.py)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf

DN = ("NHWC", "HWIO", "NHWC")


def _stats(c, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (jax.random.normal(k[0], (c,)), jax.random.uniform(k[1], (c,)) + 0.5,
          jax.random.normal(k[2], (c,)), jax.random.normal(k[3], (c,)))


@pytest.mark.parametrize("axis,shape", [(-1, (2, 5, 5, 3)), (1, (2, 3, 5, 5)),
                                        (0, (4, 6))])
def test_forward_and_gradient(axis, shape):
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  c = shape[axis]
  mean, var, scale, bias = _stats(c)
  bshape = [1] * len(shape)
  bshape[axis] = c
  b = lambda v: v.reshape(bshape)
  ref = (x - b(mean)) / jnp.sqrt(b(var) + 1e-5) * b(scale) + b(bias)
  y = lv.frozen_batch_norm(x, mean, var, scale, bias, axis=axis)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(jax.random.PRNGKey(2), shape)
  grads = jax.grad(lambda *a: jnp.sum(g * lv.frozen_batch_norm(
      *a, axis=axis)), argnums=(0, 1, 2, 3, 4))(x, mean, var, scale, bias)
  np.testing.assert_allclose(grads[0],
                             g * b(scale) / jnp.sqrt(b(var) + 1e-5),
                             rtol=1e-5)
  for frozen in grads[1:]:
    np.testing.assert_array_equal(frozen, 0.0)


def test_keeps_only_a_per_channel_vector():
  x = jnp.ones((4, 8, 8, 16))
  mean, var, scale, bias = _stats(16)
  f = lambda x: lv.frozen_batch_norm(x, mean, var, scale, bias)
  assert lv.measure.vjp_residual_bytes(f, x) == 4 * 16


def test_flax_module_loads_batchnorm_variables():
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 6))
  bn = nn.BatchNorm(use_running_average=True)
  variables = bn.init(jax.random.PRNGKey(0), x)
  mean, var, scale, bias = _stats(6, 4)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": mean, "var": var}}
  frozen = lvf.FrozenBatchNorm()
  assert jax.tree_util.tree_structure(
      frozen.init(jax.random.PRNGKey(0), x)) == jax.tree_util.tree_structure(
          variables)
  np.testing.assert_allclose(frozen.apply(variables, x, True),
                             bn.apply(variables, x), rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(frozen.apply(
      {"params": p, "batch_stats": variables["batch_stats"]}, x)))(
          variables["params"])
  np.testing.assert_array_equal(grads["scale"], 0.0)


def test_xla_keeps_nothing_per_layer():
  # conv (gradfilter r4) -> frozen BN -> lv.relu: per layer XLA keeps the
  # pooled activation and the mask, nothing for the BatchNorm.
  shape = (8, 16, 16, 8)
  conv = lv.compressed_conv(method="gradfilter", radius=4)
  mean, var, scale, bias = _stats(8)

  def build(bn):
    def make(depth):
      key = jax.random.PRNGKey(0)
      x = jax.random.normal(key, shape)
      ws = [0.2 * jax.random.normal(jax.random.fold_in(key, i),
                                    (3, 3, 8, 8)) for i in range(depth)]

      def loss(params, x):
        ws, affine = params
        for w in ws:
          x = lv.relu(bn(conv(x, w, (1, 1), "SAME", dimension_numbers=DN),
                         affine))
        return jnp.sum(x)

      def step(params, x):
        grads = jax.grad(loss)(params, x)
        return jax.tree_util.tree_map(lambda g: jnp.sum(g * g), grads)
      return jax.jit(step), ((ws, (scale, bias)), x)
    return make

  frozen = lambda y, affine: lv.frozen_batch_norm(y, mean, var, *affine)
  # Four depths: XLA's buffer packing makes single steps uneven (one
  # 4-layer step can add 4.6 KB and the next 9.2 KB), the fitted slope is not.
  ours, _ = lv.measure.temp_bytes_per_layer(build(frozen), (4, 8, 12, 16))
  act = 4 * math.prod(shape)
  formula = act / 16 + act / 32          # r = 4 pooled input + 1-bit mask
  assert 0.85 * formula <= ours <= 1.15 * formula, (ours, formula)
  # The same affine with trained scale and bias keeps x - mean (jaxpr).
  trained = lambda y, s, b: (y - mean) * lax.rsqrt(var + 1e-5) * s + b
  assert lv.measure.vjp_residual_bytes(
      trained, jnp.ones(shape), scale, bias) >= act
