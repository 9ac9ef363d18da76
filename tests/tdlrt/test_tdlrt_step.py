"""The TDLRT step: exactness at full rank, orthonormality, τ, jit, descent."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_vjp import tdlrt as lt
from lowrank_vjp._src.tdlrt import step as tdlrt_src
from lowrank_vjp._src.tensor import algebra


def _regression(shape, key=0, n=32, dtype=jnp.float32, target_ranks=None):
  """Least squares ``‖x · reshape(W, [-1, O]) − y‖²`` with a Tucker target."""
  k1, k2 = jax.random.split(jax.random.key(key))
  m, o = int(np.prod(shape[:-1])), shape[-1]
  x = jax.random.normal(k1, (n, m), dtype)
  if target_ranks is None:
    y = jax.random.normal(k2, (n, o), dtype)
  else:
    tgt = jax.jit(lambda k: _random_tucker(k, shape, target_ranks,
                                           dtype=dtype).kernel())(k2)
    y = x @ tgt.reshape(m, o)

  def loss_fn(params, batch):
    x, y = batch
    k = lt.materialize(params)["w"].reshape(m, o)
    return jnp.mean(jnp.sum((x @ k - y) ** 2, axis=-1))
  return loss_fn, (x, y)


@functools.partial(jax.jit, static_argnums=(1, 2),
                   static_argnames=("dtype",))
def _random_tucker(key, shape, ranks, dtype=jnp.float32):
  """``lt.random_tucker``, jitted: one compile, not its operations one by
  one (the initialiser itself is tested eagerly in test_tdlrt_weight.py)."""
  return lt.random_tucker(key, shape, ranks, dtype=dtype)


def _orth_err(u, r):
  eye = np.diag((np.arange(u.shape[1]) < r).astype(np.float64))
  u = np.asarray(u, np.float64)   # in NumPy: no compile per factor shape
  return float(np.max(np.abs(u.T @ u - eye)))


@pytest.mark.parametrize("factorization", ["tucker", "matrix"])
def test_full_rank_step_is_a_gradient_step(x64, factorization):
  """At full rank and τ = 0 one step (SGD) is ``W − λ∇W`` to round-off."""
  shape, lr = (3, 3, 4, 5), 0.05
  loss_fn, batch = _regression(shape, dtype=jnp.float64)
  kernel = jax.random.normal(jax.random.key(3), shape, jnp.float64)
  w = jax.jit(lambda k: lt.tucker_from_kernel(
      k, ranks=None, factorization=factorization))(kernel)
  opt = optax.sgd(lr)
  step = jax.jit(functools.partial(lt.step, loss_fn, opt,
                                   lt.TDLRTConfig(tau=0.0)))
  state, metrics = step(lt.init(opt, {"w": w}), batch)
  grad = jax.jit(jax.grad(lambda k: loss_fn({"w": k}, batch)))(kernel)
  np.testing.assert_allclose(state.params["w"].kernel(), kernel - lr * grad,
                             rtol=0, atol=1e-12 * float(jnp.abs(kernel).max()))
  full = [min(n, int(np.prod(w.modes)) // n) for n in w.modes]
  np.testing.assert_array_equal(metrics["layers"]["['w']"]["ranks"], full)


def test_full_rank_momentum_follows_the_rotating_factors(x64):
  """Momentum state is carried through the factor changes exactly."""
  shape, lr = (3, 4, 5), 0.02
  loss_fn, batch = _regression(shape, dtype=jnp.float64)
  kernel = jax.random.normal(jax.random.key(4), shape, jnp.float64)
  opt = optax.sgd(lr, momentum=0.9)
  step = jax.jit(functools.partial(lt.step, loss_fn, opt, lt.TDLRTConfig(
      tau=0.0, align_bases=True)))
  state = lt.init(opt, {"w": jax.jit(
      lambda k: lt.tucker_from_kernel(k, ranks=None))(kernel)})
  ref, ref_state = kernel, opt.init(kernel)
  grad = jax.jit(jax.grad(lambda k: loss_fn({"w": k}, batch)))
  for _ in range(3):
    state, _ = step(state, batch)
    g = grad(ref)
    upd, ref_state = opt.update(g, ref_state, ref)
    ref = optax.apply_updates(ref, upd)
  np.testing.assert_allclose(state.params["w"].kernel(), ref, atol=1e-11)


def test_factors_stay_orthonormal_while_ranks_change():
  shape = (3, 8, 8)
  loss_fn, batch = _regression(shape, target_ranks=(2, 2, 3), n=64)
  w = _random_tucker(jax.random.key(1), shape, (3, 5, 5))
  opt = optax.adam(2e-2)
  step = jax.jit(functools.partial(lt.step, loss_fn, opt,
                                   lt.TDLRTConfig(tau=0.1)))
  state = lt.init(opt, {"w": w})
  seen = set()
  for _ in range(60):
    state, m = step(state, batch)
    ranks = tuple(int(r) for r in m["layers"]["['w']"]["ranks"])
    seen.add(ranks)
    w = state.params["w"]
    for u, r in zip(w.factors, ranks, strict=False):
      assert _orth_err(u, r) < 1e-5
      assert np.all(np.asarray(u)[:, r:] == 0)
    core = np.asarray(w.core)
    assert np.all(core[ranks[0]:] == 0) and np.all(core[:, ranks[1]:] == 0)
  assert len(seen) > 1                       # the ranks did move
  # One compiled step served every rank.
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_loss_falls_and_ranks_are_found():
  shape = (3, 8, 8)
  loss_fn, batch = _regression(shape, target_ranks=(2, 2, 3), n=96)
  w = _random_tucker(jax.random.key(2), shape, (3, 6, 6))
  opt = optax.adam(5e-2)
  step = jax.jit(functools.partial(lt.step, loss_fn, opt,
                                   lt.TDLRTConfig(tau=0.1)))
  state = lt.init(opt, {"w": w})
  losses = []
  for _ in range(150):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 1e-3 * losses[0]
  np.testing.assert_array_equal(state.params["w"].ranks(), [2, 2, 3])


@pytest.mark.parametrize("tau", [0.05, 0.2, 0.5])
def test_truncation_honours_tau(x64, tau):
  # A core with decaying mode spectra, padded into a larger capacity.
  key = jax.random.key(5)
  core = jax.random.normal(key, (6, 7, 5), jnp.float64)
  for i, n in enumerate(core.shape):
    core = algebra.mode_dot(core, jnp.diag(0.6 ** jnp.arange(n)), i)
  core = jnp.pad(core, ((0, 2), (0, 0), (0, 1)))          # masked slots
  active = jnp.array([6, 7, 5])
  capacity = (8, 7, 6)

  @jax.jit   # one compile per τ (op by op: hundreds of small programs)
  def truncated(core, active):
    new, projs, kept, needed = lt.truncate_core(core, active, capacity, tau)
    return new, projs, kept, needed, algebra.tucker_product(new, projs)

  new, projs, kept, needed, approx = truncated(core, active)
  norm = float(jnp.linalg.norm(core))
  assert float(jnp.linalg.norm(core - approx)) <= np.sqrt(3) * tau * norm
  for i, r in enumerate(np.asarray(kept)):
    s = np.linalg.svd(np.asarray(algebra.unfold(core, i)), compute_uv=False)
    tail = lambda k, s=s: np.sqrt(np.sum(s[k:] ** 2))
    assert tail(r) <= tau * norm * (1 + 1e-9)           # honours τ …
    assert r == 1 or tail(r - 1) > tau * norm           # … and is minimal
    assert _orth_err(projs[i], r) < 1e-10
    assert np.all(np.asarray(projs[i])[int(active[i]):] == 0)
  np.testing.assert_array_equal(kept, needed)


def test_adaptive_modes_keep_the_other_factors():
  shape = (3, 6, 6)
  loss_fn, batch = _regression(shape, target_ranks=(3, 2, 2), n=48)
  w = _random_tucker(jax.random.key(3), shape, (None, 4, 4))
  opt = optax.adam(5e-2)
  config = lt.TDLRTConfig(tau=0.1, adaptive_modes=(-2, -1))
  assert config.modes(3) == (1, 2) and config.modes(2) == (0, 1)
  step = jax.jit(functools.partial(lt.step, loss_fn, opt, config))
  state = lt.init(opt, {"w": w})
  for _ in range(40):
    state, m = step(state, batch)
  np.testing.assert_array_equal(state.params["w"].factors[0], w.factors[0])
  assert int(m["layers"]["['w']"]["ranks"][0]) == 3
  assert _orth_err(state.params["w"].factors[1],
                   int(m["layers"]["['w']"]["ranks"][1])) < 1e-5


def test_truncation_caps_at_capacity_and_reports_need(x64):
  core = jax.random.normal(jax.random.key(0), (6, 6), jnp.float64)
  _, _, kept, needed = lt.truncate_core(core, jnp.array([6, 6]), (3, 3), 0.01)
  np.testing.assert_array_equal(kept, [3, 3])
  assert np.all(np.asarray(needed) > 3)


def test_augment_basis(x64):
  n, cap = 10, 4
  u, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (n, cap),
                                         jnp.float64))
  u = u.at[:, 3:].set(0.0)                                # rank 3
  g = jax.random.normal(jax.random.key(1), (n, cap), jnp.float64)
  g = g.at[:, 3:].set(0.0)
  basis, aug = lt.augment_basis(u, g, 3, min(2 * cap, n), 1e-8)
  assert basis.shape == (n, 8) and int(aug) == 6
  np.testing.assert_allclose(basis[:, :3], u[:, :3])        # old basis first
  assert _orth_err(basis, 6) < 1e-12
  # The augmented space holds the gradient (and so K − λ∂L/∂K for any λ).
  np.testing.assert_allclose(basis @ (basis.T @ g), g, atol=1e-12)
  # A gradient inside span(U) adds nothing; so does a full-rank basis.
  _, aug = lt.augment_basis(u, u * 2.0, 3, 8, 1e-8)
  assert int(aug) == 3
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (4, 4),
                                         jnp.float64))
  full, aug = lt.augment_basis(q, g[:4], 4, 4, 1e-8)
  assert int(aug) == 4 and full.shape == (4, 4)


def test_second_moments_follow_squared_maps():
  params = {"w": lt.random_tucker(jax.random.key(0), (4, 5), (2, 3)),
            "b": jnp.ones(3)}
  opt = optax.adam(1e-3)
  state = opt.init(lt.core_tree(params))
  state = jax.tree_util.tree_map(lambda x: x + 1.0, state)
  path = lt.core_tree  # noqa: F841 (documentation: the tree Adam sees)
  m = jnp.array([[0.6, 0.8], [-0.8, 0.6]])
  out = tdlrt_src.transport_state(state, [(
      (jax.tree_util.DictKey("w"),), (2, 3),
      lambda x: algebra.mode_dot(x, m, 0),
      lambda x: algebra.mode_dot(x, m * m, 0))])
  adam = out[0]
  np.testing.assert_allclose(adam.mu["w"], m @ state[0].mu["w"], rtol=1e-6)
  np.testing.assert_allclose(adam.nu["w"], (m * m) @ state[0].nu["w"],
                             rtol=1e-6)
  np.testing.assert_allclose(adam.mu["b"], state[0].mu["b"])
  assert int(adam.count) == int(state[0].count)


def test_tucker_adapter_trains_with_tdlrt():
  shape = (3, 6, 6)
  loss_fn, batch = _regression(shape, n=48)
  base = 0.1 * jax.random.normal(jax.random.key(7), shape)
  params = {"w": jax.jit(lambda k, b: lt.tucker_adapter(k, b, (3, 3, 3)))(
      jax.random.key(8), base)}
  opt = optax.adam(1e-2)
  step = jax.jit(functools.partial(lt.step, loss_fn, opt,
                                   lt.TDLRTConfig(tau=0.1)))
  state = lt.init(opt, params)
  first = None
  for _ in range(40):
    state, m = step(state, batch)
    first = float(m["loss"]) if first is None else first
  assert float(m["loss"]) < 0.8 * first
  np.testing.assert_array_equal(state.params["w"].base, base)
  assert "['w'].delta" in m["layers"]


def test_errors():
  opt = optax.sgd(0.1)
  with pytest.raises(ValueError, match="TuckerWeight"):
    lt.step(lambda p, b: jnp.sum(p["a"]), opt, lt.TDLRTConfig(),
            lt.init(opt, {"a": jnp.ones(3)}), None)
  for bad in (dict(tau=-0.1), dict(min_rank=0), dict(orth_tol=-1.0),
              dict(adaptive_modes=(0.5,))):
    with pytest.raises(ValueError):
      lt.TDLRTConfig(**bad)


# ------------------------------------------------ the stages, one by one --


def test_stages_in_a_row_are_the_step():
  shape = (3, 3, 6, 8)
  loss_fn, batch = _regression(shape, key=2)
  w = _random_tucker(jax.random.key(5), shape, (3, 3, 3, 4))
  opt = optax.adam(1e-2)
  config = lt.TDLRTConfig(tau=0.1)
  fused = jax.jit(functools.partial(lt.step, loss_fn, opt, config))
  augment = jax.jit(functools.partial(lt.augment, loss_fn, config))
  galerkin = jax.jit(functools.partial(lt.galerkin_step, loss_fn, opt))
  truncate = jax.jit(functools.partial(lt.truncate, config))
  a = b = lt.init(opt, {"w": w})
  for _ in range(3):
    a, ma = fused(a, batch)
    b, mb = augment(b, batch)
    assert b.augmented and b.capacities == ((3, 3, 3, 4),)
    assert b.params["w"].core.shape == (3, 3, 6, 8)
    b, _ = galerkin(b, batch)
    b, mt = truncate(b)
    assert not b.augmented
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(ma["layers"]["['w']"]["ranks"],
                                mt["layers"]["['w']"]["ranks"])


def test_augment_keeps_the_weight_and_galerkin_keeps_the_bases():
  shape = (3, 3, 6, 8)
  loss_fn, batch = _regression(shape, key=3)
  w = _random_tucker(jax.random.key(6), shape, (3, 3, 2, 3))
  opt = optax.adam(1e-2)
  state = lt.init(opt, {"w": w})
  aug, m = jax.jit(functools.partial(lt.augment, loss_fn,
                                     lt.TDLRTConfig()))(state, batch)
  np.testing.assert_allclose(aug.params["w"].kernel(), w.kernel(), atol=1e-6)
  assert int(aug.step) == 0
  np.testing.assert_array_equal(m["layers"]["['w']"]["augmented_ranks"],
                                [3, 3, 4, 6])
  galerkin = jax.jit(functools.partial(lt.galerkin_step, loss_fn, opt))
  moved, _ = galerkin(aug, batch)
  moved, _ = galerkin(moved, batch)
  assert int(moved.step) == 2 and moved.capacities == aug.capacities
  for f, g in zip(moved.params["w"].factors, aug.params["w"].factors,
                  strict=True):
    np.testing.assert_array_equal(f, g)
  assert not np.allclose(moved.params["w"].core, aug.params["w"].core)


def test_galerkin_steps_at_full_rank_are_gradient_steps(x64):
  """Complete bases: k Galerkin steps in one augmented basis (SGD) are k
  steps ``W − λ∇W`` on k different batches, to round-off."""
  shape, lr = (3, 3, 4, 5), 0.05
  kernel = jax.random.normal(jax.random.key(3), shape, jnp.float64)
  w = jax.jit(lambda k: lt.tucker_from_kernel(k, ranks=None))(kernel)
  opt = optax.sgd(lr)
  config = lt.TDLRTConfig(tau=0.0)
  cycle = lt.Cycle(adaptive_steps=3, local_steps=3)
  stages = {lt.AUGMENT: None, lt.GALERKIN: None, lt.TRUNCATE: None}
  state, ref = lt.init(opt, {"w": w}), kernel
  for i in range(cycle.total_steps):
    loss_fn, batch = _regression(shape, key=10 + i, dtype=jnp.float64)
    stages[lt.AUGMENT] = functools.partial(lt.augment, loss_fn, config)
    stages[lt.GALERKIN] = functools.partial(lt.galerkin_step, loss_fn, opt)
    for action in cycle.actions(i):
      if action == lt.TRUNCATE:
        state, _ = lt.truncate(config, state)
      else:
        state, _ = jax.jit(stages[action])(state, batch)
    ref = ref - lr * jax.jit(jax.grad(lambda k, b, f=loss_fn: f(
        {"w": k}, b)))(ref, batch)
  assert not state.augmented
  np.testing.assert_allclose(state.params["w"].kernel(), ref, rtol=0,
                             atol=1e-12 * float(jnp.abs(kernel).max()))


@pytest.mark.parametrize("moments", ["mean", "zero"])
def test_second_moment_handling(moments):
  shape = (3, 3, 6, 8)
  loss_fn, batch = _regression(shape, key=4)
  w = _random_tucker(jax.random.key(7), shape, (3, 3, 2, 3))
  opt = optax.adam(1e-2)
  config = lt.TDLRTConfig(tau=0.2, second_moments=moments)
  state = lt.init(opt, {"w": w})
  state, _ = jax.jit(functools.partial(lt.step, loss_fn, opt, config))(
      state, batch)                      # some non-zero moments
  nu = state.opt_state[0].nu["w"]
  ranks = [int(r) for r in state.params["w"].ranks()]
  aug, _ = jax.jit(functools.partial(lt.augment, loss_fn, config))(
      state, batch)
  new_nu = aug.opt_state[0].nu["w"]
  old = algebra.rank_mask(nu.shape, ranks)
  padded = np.zeros(new_nu.shape, np.float32)
  padded[tuple(slice(0, n) for n in nu.shape)] = np.where(old, nu, 0.0)
  mask = np.zeros(new_nu.shape, bool)
  mask[tuple(slice(0, r) for r in ranks)] = True
  np.testing.assert_array_equal(np.asarray(new_nu)[mask], padded[mask])
  fill = np.asarray(new_nu)[~mask]
  expected = 0.0 if moments == "zero" else float(np.mean(np.asarray(nu)[old]))
  np.testing.assert_allclose(fill, expected, rtol=1e-6)
  # Truncation: the maps of the second moment, checked against the formula
  # with the projections the truncation used.
  stepped, _ = jax.jit(functools.partial(lt.galerkin_step, loss_fn, opt))(
      aug, batch)
  v = stepped.opt_state[0].nu["w"]
  _, projs, _, _ = tdlrt_src.truncate_core(
      stepped.params["w"].core, stepped.params["w"].ranks(), (3, 3, 2, 3),
      config.tau)
  out, _ = jax.jit(functools.partial(lt.truncate, config))(stepped)
  if moments == "zero":
    expected = jnp.square(tdlrt_src._project(jnp.sqrt(v), projs))
  else:
    expected = tdlrt_src._project(v, tuple(p * p for p in projs))
  np.testing.assert_allclose(out.opt_state[0].nu["w"], expected, rtol=1e-4,
                             atol=1e-12)


def test_stage_errors():
  shape = (3, 4)
  loss_fn, batch = _regression(shape)
  opt = optax.sgd(0.1)
  state = lt.init(opt, {"w": _random_tucker(jax.random.key(0), shape,
                                            (2, 2))})
  with pytest.raises(ValueError, match="not augmented"):
    lt.truncate(lt.TDLRTConfig(), state)
  aug, _ = lt.augment(loss_fn, lt.TDLRTConfig(), state, batch)
  with pytest.raises(ValueError, match="already augmented"):
    lt.augment(loss_fn, lt.TDLRTConfig(), aug, batch)
  with pytest.raises(ValueError, match="already augmented"):
    lt.step(loss_fn, opt, lt.TDLRTConfig(), aug, batch)
  with pytest.raises(ValueError, match="second_moments"):
    lt.TDLRTConfig(second_moments="reference")
