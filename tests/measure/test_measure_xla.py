"""Memory really saved: jaxpr-level residuals and XLA's compiled temp bytes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowrank_vjp as lv

DN = ("NHWC", "HWIO", "NHWC")
SHAPE = (8, 16, 16, 16)  # one f32 activation = 128 KiB
ACT_BYTES = 4 * math.prod(SHAPE)


def _stack(conv, act):
  def build(depth):
    def loss(ws, x):
      for w in ws:
        x = act(conv(x, w, (1, 1), "SAME", dimension_numbers=DN))
      return jnp.sum(x)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, SHAPE)
    ws = [0.1 * jax.random.normal(jax.random.fold_in(key, i),
                                  (3, 3, SHAPE[-1], SHAPE[-1]))
          for i in range(depth)]
    # Gradients reduced to a scalar, so that no residual can hide in an idle
    # gradient output buffer (outside temp bytes).
    def step(ws, x):
      return sum(jnp.vdot(g, g) for g in jax.grad(loss)(ws, x))
    return jax.jit(step), (ws, x)
  return build


def _one_layer_closure(conv):
  x = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  w = 0.1 * jax.random.normal(jax.random.PRNGKey(2), (3, 3, 16, 16))
  f = lambda x, w: lv.relu(conv(x, w, (1, 1), "SAME", dimension_numbers=DN))
  closure = jax.eval_shape(lambda x, w: jax.vjp(f, x, w)[1], x, w)
  leaves = jax.tree_util.tree_leaves(closure)
  return leaves, lv.measure.vjp_residual_bytes(f, x, w)


@pytest.mark.parametrize("method", ["hosvd", "svd"])
def test_jaxpr_residuals_hold_no_full_size_array(method):
  conv = lv.compressed_conv(method=method, eps=0.9, on_overflow="ignore")
  leaves, total = _one_layer_closure(conv)
  x_size = math.prod(SHAPE)
  assert all(math.prod(l.shape) < x_size for l in leaves), [
      l.shape for l in leaves]
  w_bytes = 4 * 3 * 3 * 16 * 16
  assert total - w_bytes < 0.7 * ACT_BYTES


def test_jaxpr_residuals_of_vanilla_hold_the_input():
  leaves, total = _one_layer_closure(lv.compressed_conv(method="none"))
  assert any(math.prod(l.shape) == math.prod(SHAPE) for l in leaves)
  assert total >= ACT_BYTES


@pytest.mark.parametrize("method,act,low,high", [
    ("none", lv.relu, 1.0, 1.3),      # input + 1-bit mask
    ("hosvd", lv.relu, 0.0, 0.4),
    ("svd", lv.relu, 0.4, 0.8),       # half-batch core (0.5) + mask (0.125)
    # jax.nn.relu keeps its f32 input: the compressed conv saves ~nothing.
    ("hosvd", jax.nn.relu, 0.9, 1.6),
])
def test_xla_temp_bytes_per_layer(method, act, low, high):
  settings = {} if method == "none" else dict(eps=0.9, on_overflow="ignore")
  conv = lv.compressed_conv(method=method, **settings)
  slope, temps = lv.measure.temp_bytes_per_layer(_stack(conv, act))
  ratio = slope / ACT_BYTES
  assert low <= ratio <= high, (ratio, temps)


def test_xla_vanilla_lax_matches_method_none():
  s_lax, _ = lv.measure.temp_bytes_per_layer(
      _stack(lax.conv_general_dilated, lv.relu), depths=(4, 8))
  s_none, _ = lv.measure.temp_bytes_per_layer(
      _stack(lv.compressed_conv(method="none"), lv.relu), depths=(4, 8))
  assert s_lax == pytest.approx(s_none, rel=0.05)


def test_xla_memory_fields():
  m = lv.measure.xla_memory(lambda x: jnp.sin(x) @ x.T, jnp.ones((64, 32)))
  assert m.argument_bytes == 64 * 32 * 4
  assert m.output_bytes == 64 * 64 * 4
  assert m.peak_bytes == (m.argument_bytes + m.output_bytes + m.temp_bytes
                          - m.alias_bytes)
  assert "temp" in str(m)


def test_layer_table_counts_paper_formula_at_needed_ranks():
  # Exactly multilinear rank (2, 3, 1, 2) activation: the analytic count is
  # (Π K + Σ I·K) · 4 bytes at those ranks, the saved bytes at the capacity.
  shape = (6, 8, 8, 5)

  @jax.jit   # one compile (op by op: every operation on its own)
  def activation(key):
    k = jax.random.split(key, 5)
    core = jax.random.normal(k[0], (2, 3, 1, 2))
    x = core
    for axis, (n, r) in enumerate(zip(shape, core.shape)):
      u = jnp.linalg.qr(jax.random.normal(k[axis + 1], (n, r)))[0]
      x = jnp.moveaxis(jnp.tensordot(x, u, axes=([axis], [1])), -1, axis)
    return x

  x = activation(jax.random.PRNGKey(3))
  w = jnp.ones((3, 3, 5, 4))
  conv = lv.compressed_conv(method="hosvd", eps=0.999, ranks=(3, 4, 4, 3))
  _, stats = jax.jit(lambda x, w: conv.with_stats(
      x, w, (1, 1), "SAME", dimension_numbers=DN))(x, w)
  np.testing.assert_array_equal(stats.needed_ranks, [2, 3, 1, 2])
  (row,) = lv.measure.layer_table({"conv": stats})
  assert row.analytic_bytes == 4 * (2 * 3 * 1 * 2 + 6 * 2 + 8 * 3 + 8 * 1
                                    + 5 * 2)
  assert row.saved_bytes == 4 * (3 * 4 * 4 * 3 + 6 * 3 + 8 * 4 + 8 * 4 + 5 * 3)
  assert row.activation_bytes == 4 * math.prod(shape)
  text = lv.measure.format_table([row])
  assert "conv" in text and "total" in text


def test_layer_table_svd_formula():
  x = jax.random.normal(jax.random.PRNGKey(4), (8, 6, 6, 4))
  conv = lv.compressed_conv(method="svd", eps=1.0)
  _, stats = conv.with_stats(x, jnp.ones((1, 1, 4, 2)), (1, 1), "VALID",
                             dimension_numbers=DN)
  (row,) = lv.measure.layer_table({"c": stats})
  k = int(stats.needed_ranks[0])
  assert row.analytic_bytes == 4 * (k * 6 * 6 * 4 + 8 * k)
