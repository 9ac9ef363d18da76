"""Max pooling with bit-packed argmax codes (layers/pooling.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv

CASES = [
    # window, strides, padding, input shape
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (2, 12, 12, 3)),   # ResNet's stem
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (2, 11, 13, 2)),   # odd sides
    ((2, 2), (2, 2), "VALID", (2, 9, 8, 3)),              # VALID remainder
    ((3, 3), (1, 1), "SAME", (1, 7, 7, 2)),               # overlapping
    ((3,), (2,), "SAME", (2, 10, 4)),                     # 1-D
    ((1, 1), (2, 2), "VALID", (1, 6, 6, 2)),              # phases with no tap
]


@pytest.mark.parametrize("window,strides,padding,shape", CASES)
def test_values_and_gradient_equal_flax(window, strides, padding, shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ref = lambda x: nn.max_pool(x, window, strides, padding)
  ours = lambda x: lv.max_pool(x, window, strides, padding)
  np.testing.assert_array_equal(ours(x), ref(x))
  g = jax.random.normal(jax.random.PRNGKey(1), ref(x).shape)
  grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x) * g)))(x)
  np.testing.assert_allclose(grad(ours), grad(ref), rtol=1e-6, atol=1e-6)


def test_ties_send_the_cotangent_to_one_maximum():
  # Constant windows: every tap ties; the whole cotangent reaches one tap.
  x = jnp.ones((1, 6, 6, 1))
  f = lambda x: jnp.sum(lv.max_pool(x, (2, 2), (2, 2)))
  g = jax.grad(f)(x)
  assert float(g.sum()) == 9.0
  assert set(np.unique(np.asarray(g)).tolist()) == {0.0, 1.0}


def test_nan_and_inf_do_not_crash():
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 8, 8, 2))
  x = x.at[0, 0, 0, 0].set(jnp.nan).at[0, 5, 5, 1].set(jnp.inf)
  y, vjp = jax.vjp(lambda x: lv.max_pool(x, (3, 3), (2, 2), "SAME"), x)
  (g,) = vjp(jnp.ones_like(y))
  assert bool(jnp.isnan(y[0, 0, 0, 0]))
  assert bool(jnp.isinf(y).any())
  assert g.shape == x.shape and bool(jnp.isfinite(g).all())


def test_residual_is_four_bits_per_output():
  x = jnp.ones((4, 32, 32, 16))
  f = lambda x: lv.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  outputs = f(x).size
  assert lv.measure.vjp_residual_bytes(f, x) <= outputs // 2 + 64


def test_backward_holds_about_one_input_of_temp():
  x = jax.ShapeDtypeStruct((8, 64, 64, 32), jnp.float32)
  f = lambda x: lv.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  y = jax.eval_shape(f, x)
  bwd = jax.jit(lambda x, g: jax.vjp(f, x)[1](g)[0])
  m = lv.measure.xla_memory(bwd, x, y)
  x_bytes = 8 * 64 * 64 * 32 * 4
  # The codes (from the taps' padded slices, fused) and the cotangent
  # placement, fused into the output: 0.03x (1.09x with one padded copy of
  # x for the codes); flax.linen.max_pool's select_and_scatter_add held
  # five padded copies.
  assert m.temp_bytes < 0.25 * x_bytes, m.temp_bytes / x_bytes


def test_forward_holds_no_padded_copy_of_the_input():
  # Each tap reads a padded strided slice of x, fused into the codes. One
  # padded copy of x shared by the nine taps was a buffer of its own, 1.06x
  # the input: at ResNet18's stem the step's largest, beside the ReLU's
  # input and output.
  x = jax.ShapeDtypeStruct((8, 64, 64, 32), jnp.float32)
  f = lambda x: lv.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  fwd = lambda x: jax.tree_util.tree_leaves(jax.vjp(f, x))  # y, residual
  m = lv.measure.xla_memory(fwd, x)
  x_bytes = 8 * 64 * 64 * 32 * 4
  assert m.temp_bytes < 0.1 * x_bytes, m.temp_bytes / x_bytes


def test_bad_arguments_are_named():
  x = jnp.ones((2, 8, 8, 3))
  with pytest.raises(TypeError, match="floating"):
    lv.max_pool(x.astype(jnp.int32), (2, 2))
  with pytest.raises(ValueError, match=r"\[batch, \*spatial\(2\), features\]"):
    lv.max_pool(jnp.ones((8, 8)), (2, 2))
  with pytest.raises(ValueError, match="one entry per window axis"):
    lv.max_pool(x, (2, 2), (2,))
  with pytest.raises(ValueError, match="must be positive"):
    lv.max_pool(x, (0, 2))
