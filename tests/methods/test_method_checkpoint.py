"""method="checkpoint" and lv.checkpointed (methods/checkpoint.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowrank_vjp as lv
from lowrank_vjp._src.methods import checkpoint

DN = ("NHWC", "HWIO", "NHWC")


def _args(shape=(2, 6, 6, 3), out=4):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, shape[-1], out))
  return x, w


def test_conv_gradients_are_exact(x64):
  x, w = (jnp.asarray(a, jnp.float64) for a in _args())
  conv = lv.compressed_conv(method="checkpoint")
  f = lambda x, w: jnp.sum(jnp.sin(conv(x, w, (2, 1), "SAME",
                                        dimension_numbers=DN)))
  g = lambda x, w: jnp.sum(jnp.sin(lax.conv_general_dilated(
      x, w, (2, 1), "SAME", dimension_numbers=DN)))
  for a, b in zip(jax.jit(jax.grad(f, (0, 1)))(x, w),
                  jax.jit(jax.grad(g, (0, 1)))(x, w), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_dense_and_generic_function():
  x, w = jnp.ones((4, 5)), jnp.arange(15.0).reshape(5, 3)
  dense = lv.compressed_dense(method="checkpoint")
  dnums = (((1,), (0,)), ((), ()))
  gx, gw = jax.grad(lambda x, w: jnp.sum(dense(x, w, dnums) ** 2), (0, 1))(
      x, w)
  y = x @ w
  np.testing.assert_allclose(gx, 2 * y @ w.T)
  np.testing.assert_allclose(gw, x.T @ (2 * y))

  @lv.compressed_conv(method="checkpoint")
  def f(x, w):
    return jnp.tanh(x) @ w     # any function of (x, w)
  np.testing.assert_allclose(
      jax.grad(lambda w: jnp.sum(f(x, w)))(w),
      jax.grad(lambda w: jnp.sum(jnp.tanh(x) @ w))(w), rtol=1e-6)


def test_stats_say_the_input_is_kept():
  x, w = _args()
  conv = lv.compressed_conv(method="checkpoint")
  _, stats = conv.with_stats(x, w, (1, 1), "SAME", dimension_numbers=DN)
  assert stats.method == "checkpoint"
  assert stats.residual_nbytes == 4 * x.size
  assert stats.capacity == (None,) * 4
  # No ranks: a rank controller's capacities leave the method as it is.
  method = lv.methods.Checkpoint()
  assert method.with_capacity(x.shape) is method
  _, stats, state = method.apply(
      lv.compressed_conv().op(x, w, (1, 1), "SAME", dimension_numbers=DN),
      x, w)
  assert stats.capacity == (None,) * 4 and state is None
  f = lambda x, w: conv(x, w, (1, 1), "SAME", dimension_numbers=DN)
  assert lv.measure.vjp_residual_bytes(f, x, w) == 4 * (x.size + w.size)


def _block(x, w, stats):
  y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
  return lv.relu(lv.frozen_batch_norm(y, *stats) * 2.0 + jnp.tanh(y))


def test_checkpointed_block_keeps_only_its_inputs():
  x, w = _args((2, 8, 8, 4), 4)
  stats = tuple(jnp.ones(4) for _ in range(4))
  wrapped = lv.checkpointed(_block)
  f = lambda x, w: wrapped(wrapped(x, w, stats), w, stats)
  g = lambda x, w: _block(_block(x, w, stats), w, stats)
  ours = jax.jit(jax.grad(lambda *args: jnp.sum(f(*args)), (0, 1)))(x, w)
  plain = jax.jit(jax.grad(lambda *args: jnp.sum(g(*args)), (0, 1)))(x, w)
  for a, b in zip(ours, plain, strict=True):
    # Float32 round-off of the recomputed forward, relative to the largest
    # entry (a pure rtol fails on entries near zero).
    np.testing.assert_allclose(a, b, rtol=1e-5,
                               atol=1e-6 * float(jnp.max(jnp.abs(b))))
  # Two block inputs (x and the first block's output), the kernel, the
  # frozen statistics; the vanilla blocks keep their tanh and BN as well.
  expect = 4 * (2 * x.size + w.size + 4 * 4)
  assert lv.measure.vjp_residual_bytes(f, x, w) == expect
  assert lv.measure.vjp_residual_bytes(g, x, w) > expect + 4 * x.size
  # Decorator form with static arguments.
  scaled = lv.checkpointed(static_argnums=(2,))(
      lambda x, w, k: k * _block(x, w, stats))
  np.testing.assert_allclose(scaled(x, w, 3.0), 3.0 * _block(x, w, stats),
                             rtol=1e-6)


@pytest.mark.parametrize("method", ["gradfilter", "quant", "checkpoint"])
def test_capacity_is_none_for_non_tucker_methods(method):
  m = lv.methods.resolve(method)
  assert not isinstance(m, lv.methods.TuckerMethod)
  assert m.with_capacity((8, 4, 4, 3)) is m
  x, w = jnp.ones((8, 4, 4, 3)), jnp.ones((3, 3, 3, 2))
  _, stats = lv.compressed_conv(method=m).with_stats(
      x, w, (1, 1), "SAME", dimension_numbers=DN)
  assert stats.capacity == (None,) * 4


def test_xla_block_input_per_block():
  # conv -> frozen BN -> lv.relu under lv.checkpointed: XLA keeps about one
  # activation per block. (With a tanh inside the block the CPU compiler,
  # which drops jax.checkpoint's anti-CSE barrier, kept the forward's tanh
  # for the backward: two activations per block; docs/memory.md.)
  shape = (8, 16, 16, 8)
  stats = tuple(jnp.full((8,), v) for v in (0.0, 1.0, 1.0, 0.1))
  wrapped = lv.checkpointed(lambda x, w, stats: lv.relu(lv.frozen_batch_norm(
      lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN),
      *stats)))

  def make(depth):
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, shape)
    ws = [0.2 * jax.random.normal(jax.random.fold_in(key, i), (3, 3, 8, 8))
          for i in range(depth)]

    def loss(ws, x):
      for w in ws:
        x = wrapped(x, w, stats)
      return jnp.sum(x)

    def step(ws, x):
      return [jnp.sum(g * g) for g in jax.grad(loss)(ws, x)]
    return jax.jit(step), (ws, x)

  slope, _ = lv.measure.temp_bytes_per_layer(make, (4, 8))
  act = 4 * math.prod(shape)
  assert 0.9 * act <= slope <= 1.2 * act, slope / act


def test_method_apply_is_the_old_checkpointed_apply(x64):
  """``Checkpoint().apply(spec, x, w)`` (was ``checkpointed.apply``)."""
  x, w = (jnp.asarray(a, jnp.float64) for a in _args())
  spec = lv.compressed_conv().op(x, w, (2, 1), "SAME", dimension_numbers=DN)
  f = lambda x, w: jnp.sum(jnp.sin(lv.methods.Checkpoint().apply(
      spec, x, w)[0]))
  g = lambda x, w: jnp.sum(jnp.sin(spec.apply(x, w)))
  for a, b in zip(jax.grad(f, (0, 1))(x, w), jax.grad(g, (0, 1))(x, w),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-12)
  assert checkpoint.residual_nbytes(x.shape, x.dtype) == 8 * x.size
  assert checkpoint.POLICY is jax.checkpoint_policies.nothing_saveable
