"""hard-swish, SiLU and GELU saving a coded slope (_src/activations.py)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
from lowrank_vjp._src.layers import activations as activations

PAIRS = {
    "hard_swish": (lv.hard_swish, jax.nn.hard_swish),
    "silu": (lv.silu, jax.nn.silu),
    "gelu": (lv.gelu, functools.partial(jax.nn.gelu, approximate=False)),
    "gelu_tanh": (functools.partial(lv.gelu, approximate=True),
                  functools.partial(jax.nn.gelu, approximate=True)),
}
DN = ("NHWC", "HWIO", "NHWC")


def _grid():
  # Every kink of hard-swish, both flat ends, and values in between.
  return jnp.concatenate([jnp.linspace(-8, 8, 1001),
                          jnp.array([-3.0, 3.0, 0.0, -1.5])])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_forward_exact_and_slope_error_bounded(name, bits):
  ours, ref = PAIRS[name]
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
  for name, (ours, _) in PAIRS.items():
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
