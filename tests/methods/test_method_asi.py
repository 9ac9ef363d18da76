"""Warm-started subspace iteration (methods/asi.py) against the exact HOSVD."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowrank_vjp as lv
from lowrank_vjp._src.methods import asi
from lowrank_vjp._src.tensor import hosvd

DN = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.jit, static_argnames=("shape", "rank"))
def _drifting(step, shape=(8, 10, 10, 12), rank=(3, 4, 4, 5), noise=0.05):
  """A Tucker tensor whose factors rotate slowly with ``step``, plus noise
  (jitted, as the helpers below: op by op, every operation compiled on its
  own)."""
  key = jax.random.PRNGKey(0)
  keys = jax.random.split(key, 2 * len(shape) + 2)
  core = jax.random.normal(keys[0], rank)
  x = core
  for a, (n, r) in enumerate(zip(shape, rank, strict=True)):
    base = jax.random.normal(keys[1 + a], (n, r))
    turn = jax.random.normal(keys[1 + len(shape) + a], (n, r))
    u = jnp.linalg.qr(base + 0.03 * step * turn)[0]
    x = jnp.moveaxis(jnp.tensordot(x, u, axes=([a], [1])), -1, a)
  return x + noise * jax.random.normal(jax.random.fold_in(keys[-1], step),
                                       shape)


@jax.jit
def _rel_err_of(res, x):
  return jnp.linalg.norm(res.reconstruct() - x) / jnp.linalg.norm(x)


def _rel_err(res, x):
  return float(_rel_err_of(res, x))


def test_warm_steps_track_exact_hosvd():
  capacity = (3, 4, 4, 5)
  state = asi.AsiState.init((8, 10, 10, 12), capacity)
  step_fn = jax.jit(lambda x, s: asi.asi_compress(x, s, capacity))
  exact_fn = jax.jit(lambda x: hosvd.tucker_compress(x, capacity, 1.0,
                                                     "hosvd"))
  gaps = []
  for step in range(8):
    x = _drifting(step)
    res, stats, state = step_fn(x, state)
    exact, _ = exact_fn(x)
    gaps.append(_rel_err(res, x) - _rel_err(exact, x))
    # Factors stay orthonormal.
    assert sorted(state.factors) == ["0", "1", "2", "3"]
    for f in state.factors.values():
      np.testing.assert_allclose(f.T @ f, np.eye(f.shape[1]), atol=1e-5)
    assert bool(jnp.all(stats.kept_energy > 0.9))
  assert abs(gaps[0]) < 1e-5            # first step: exact HOSVD
  assert max(gaps[3:]) < 2e-3           # warm steps stay on the optimum
  assert min(gaps) >= -1e-4             # never better than the optimum


def test_full_rank_gradients_are_exact():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 3))
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 3, 5))
  conv = lv.compressed_conv(method=lv.methods.Asi(ranks=(4, 6, 6, 3)))
  state = conv.init_state(x, w, (1, 1), "SAME", dimension_numbers=DN)

  def loss(w, x, state):
    y, _, new = conv.with_state(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                state=state)
    return jnp.sum(jnp.sin(y)), new

  ref = jax.grad(lambda w, x: jnp.sum(jnp.sin(lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=DN))), argnums=(0, 1))(w, x)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  for _ in range(2):   # cold, then warm (one program: started is traced)
    (g, state) = grad(w, x, state)
    for a, b in zip(g, ref, strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
  assert bool(state.started)


def test_zero_activation_is_finite():
  capacity = (2, 2, 2, 2)
  state = asi.AsiState.init((4, 5, 5, 3), capacity)
  x = jnp.zeros((4, 5, 5, 3))
  compress = jax.jit(lambda x, s: asi.asi_compress(x, s, capacity))
  _, _, state = compress(x, state)   # cold
  res, stats, _ = compress(x, state)  # warm
  assert bool(jnp.all(jnp.isfinite(res.core)))
  assert bool(jnp.all(stats.kept_energy == 1.0))


# ------------------------------------------------- the state, the method ---


def test_state_holds_only_compressed_axes():
  state = asi.AsiState.init((4, 5, 6), (2, None, 3))
  assert sorted(state.factors) == ["0", "2"]
  assert state.shapes() == {"0": (4, 2), "2": (6, 3)}
  assert not bool(state.started)
  # A pytree without None leaves.
  leaves = jax.tree_util.tree_leaves(state)
  assert len(leaves) == 3 and all(leaf is not None for leaf in leaves)
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 5, 6))
  res, stats, new = asi.asi_compress(x, state, (2, None, 3))
  assert res.factors[1] is None
  assert new.shapes() == state.shapes() and bool(new.started)
  assert stats.capacity == (2, None, 3) and stats.method == "asi"


def test_capacity_and_state_of_the_method():
  method = lv.methods.Asi(rank_fraction=0.25)
  assert method.capacity((8, 16, 16, 12)) == (2, 4, 4, 3)
  assert lv.methods.resolve("asi") == lv.methods.Asi()
  x, w = jnp.ones((8, 16, 16, 12)), jnp.ones((3, 3, 12, 4))
  conv = lv.compressed_conv(method=method)
  state = conv.init_state(x, w, (1, 1), "SAME", dimension_numbers=DN)
  assert isinstance(state, lv.methods.AsiState)
  assert state.shapes() == {"0": (8, 2), "1": (16, 4), "2": (16, 4),
                            "3": (12, 3)}
  # ASI's ranks are fixed: the rank controller's capacities are ignored.
  assert method.with_capacity((8, 16, 16, 12)) is method
  with pytest.raises(TypeError, match="state"):
    conv(x, w, (1, 1), "SAME", dimension_numbers=DN)
  with pytest.raises(ValueError, match="asi"):
    conv.with_state(jnp.ones((4, 16, 16, 12)), w, (1, 1), "SAME",
                    dimension_numbers=DN, state=state)


_DN = ("NHWC", "HWIO", "NHWC")


def _asi_step(conv):
  @jax.jit
  def step(x, w, state):
    def loss(w):
      y, s, new = conv.with_state(x, w, (1, 1), "SAME", dimension_numbers=_DN,
                                  state=state)
      return jnp.sum(y ** 2), (s, new)
    (_, (s, new)), g = jax.value_and_grad(loss, has_aux=True)(w)
    return g, s, new
  return step


def test_one_nan_batch_does_not_break_later_steps():
  """The warm start used to carry NaN factors forever."""
  k = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(k[0], (4, 8, 8, 4))
  w = jax.random.normal(k[1], (3, 3, 4, 4)) * 0.3
  conv = lv.compressed_conv(method=lv.methods.Asi(rank_fraction=0.5))
  state = conv.init_state(x, w, (1, 1), "SAME", dimension_numbers=_DN)
  step = _asi_step(conv)
  _, _, state = step(x, w, state)
  g, stats, state = step(x.at[0, 0, 0, 0].set(jnp.nan), w, state)
  assert not bool(jnp.all(jnp.isfinite(g)))
  assert bool(jnp.all(jnp.isnan(stats.kept_energy)))  # reported, as HOSVD
  for i in range(2):
    g, stats, state = step(x + 0.1 * i, w, state)
    assert bool(jnp.all(jnp.isfinite(g)))
    assert bool(jnp.all(jnp.isfinite(stats.kept_energy)))
    assert all(bool(jnp.all(jnp.isfinite(f)))
               for f in state.factors.values())


def test_a_state_of_another_shape_is_a_clear_error():
  x, w = jnp.ones((4, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  conv = lv.compressed_conv(method=lv.methods.Asi(rank_fraction=0.5))
  state = conv.init_state(x, w, (1, 1), "SAME", dimension_numbers=_DN)
  smaller = x[:3]   # a last, smaller batch
  with pytest.raises(ValueError, match=r"asi: the state holds factors"):
    conv.with_state(smaller, w, (1, 1), "SAME", dimension_numbers=_DN,
                    state=state)
  with pytest.raises(TypeError, match="with_state"):
    conv(x, w, (1, 1), "SAME", dimension_numbers=_DN)


def test_state_dtype_is_stable_under_x64(x64):
  del x64
  for dtype in (jnp.float32, jnp.float64):
    x = jnp.ones((4, 6, 6, 2), dtype) + jnp.arange(2, dtype=dtype)
    w = jnp.ones((3, 3, 2, 2), dtype)
    conv = lv.compressed_conv(method=lv.methods.Asi(rank_fraction=0.5))
    state = conv.init_state(x, w, (1, 1), "SAME", dimension_numbers=_DN)
    _, _, new = jax.jit(lambda x, w, state, conv=conv: conv.with_state(
        x, w, (1, 1), "SAME", dimension_numbers=_DN, state=state))(x, w, state)
    for key in state.factors:
      assert state.factors[key].dtype == new.factors[key].dtype == dtype


def test_scaled_activation_is_held_once():
  """The compression keeps one power-of-two-scaled copy of the activation.

  XLA rewrote the division by the scale (a broadcast scalar) into a product
  by its reciprocal and copied that cheap product into the fusion of each
  shape ASI reads the activation in: four scaled copies alive at once in
  MobileNetV2's first depthwise layer (temp here: 4.02 activations; now
  1.10, through ``schedule.divided_once``).
  """
  shape = (8, 32, 32, 24)
  capacity = (4, 16, 16, 12)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  state = jax.eval_shape(lambda: asi.AsiState.init(shape, capacity))
  temp = lv.measure.xla_memory(
      lambda x, s: asi.asi_compress(x, s, capacity), x, state).temp_bytes
  activation = np.prod(shape) * 4
  assert temp < 2.0 * activation, temp / activation
