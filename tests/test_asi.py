"""Warm-started subspace iteration against the exact truncated HOSVD."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lowrank_vjp as lv
from lowrank_vjp._src.methods import asi as asi
from lowrank_vjp._src.tensor import hosvd as decompositions

DN = ("NHWC", "HWIO", "NHWC")


def _drifting(step, shape=(8, 10, 10, 12), rank=(3, 4, 4, 5), noise=0.05):
  """A Tucker tensor whose factors rotate slowly with ``step``, plus noise."""
  key = jax.random.PRNGKey(0)
  keys = jax.random.split(key, 2 * len(shape) + 2)
  core = jax.random.normal(keys[0], rank)
  x = core
  for a, (n, r) in enumerate(zip(shape, rank)):
    base = jax.random.normal(keys[1 + a], (n, r))
    turn = jax.random.normal(keys[1 + len(shape) + a], (n, r))
    u = jnp.linalg.qr(base + 0.03 * step * turn)[0]
    x = jnp.moveaxis(jnp.tensordot(x, u, axes=([a], [1])), -1, a)
  return x + noise * jax.random.normal(jax.random.fold_in(keys[-1], step),
                                       shape)


def _rel_err(res, x):
  return float(jnp.linalg.norm(res.reconstruct() - x) / jnp.linalg.norm(x))


def test_warm_steps_track_exact_hosvd():
  capacity = (3, 4, 4, 5)
  state = asi.AsiState.init((8, 10, 10, 12), capacity)
  step_fn = jax.jit(lambda x, s: asi.asi_compress(x, s, capacity))
  gaps = []
  for step in range(8):
    x = _drifting(step)
    res, stats, state = step_fn(x, state)
    exact, _ = decompositions.tucker_compress(x, capacity, 1.0, "hosvd")
    gaps.append(_rel_err(res, x) - _rel_err(exact, x))
    # Factors stay orthonormal.
    for f in state.factors:
      np.testing.assert_allclose(f.T @ f, np.eye(f.shape[1]), atol=1e-5)
    assert bool(jnp.all(stats.kept_energy > 0.9))
  assert abs(gaps[0]) < 1e-5            # first step: exact HOSVD
  assert max(gaps[3:]) < 2e-3           # warm steps stay on the optimum
  assert min(gaps) >= -1e-4             # never better than the optimum


def test_full_rank_gradients_are_exact():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 3))
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 3, 5))
  conv = lv.asi_conv(ranks=(4, 6, 6, 3))
  state = conv.init_state(x.shape)

  def loss(w, x, state):
    y, _, new = conv(x, w, (1, 1), "SAME", dimension_numbers=DN, state=state)
    return jnp.sum(jnp.sin(y)), new

  ref = jax.grad(lambda w, x: jnp.sum(jnp.sin(lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=DN))), argnums=(0, 1))(w, x)
  for _ in range(2):   # cold, then warm
    (g, state) = jax.grad(loss, argnums=(0, 1), has_aux=True)(w, x, state)
    for a, b in zip(g, ref):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
  assert bool(state.started)


def test_zero_activation_is_finite():
  capacity = (2, 2, 2, 2)
  state = asi.AsiState.init((4, 5, 5, 3), capacity)
  x = jnp.zeros((4, 5, 5, 3))
  _, _, state = asi.asi_compress(x, state, capacity)
  res, stats, _ = asi.asi_compress(x, state, capacity)
  assert bool(jnp.all(jnp.isfinite(res.core)))
  assert bool(jnp.all(stats.kept_energy == 1.0))
