"""Rank controller: ladder, hysteresis, no accepted step below ε, compiles."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf


def test_ladder_rungs_and_fit():
  ladder = lv.RankLadder()
  assert ladder.rungs(40) == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40)
  assert ladder.rungs(1) == (1,)
  assert ladder.rungs(8) == (1, 2, 3, 4, 6, 8)
  assert ladder.fit(5, 40) == 6 and ladder.fit(1, 40) == 1
  assert ladder.fit(39, 40) == 40 and ladder.fit(7, 7) == 7
  assert lv.RankLadder(minimum=4).rungs(20) == (4, 6, 8, 12, 16, 20)
  with pytest.raises(ValueError, match="minimum"):
    lv.RankLadder(minimum=0)
  fine = lv.RankLadder(per_octave=4)
  assert fine.rungs(40) == (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24,
                            28, 32, 40)
  assert fine.fit(9, 40) == 10
  rungs = np.asarray(lv.RankLadder(per_octave=8).rungs(4096))
  assert np.max(rungs[9:-1] / rungs[8:-2]) <= 1.125   # above 8: ≤ 1/8 apart
  with pytest.raises(ValueError, match="per_octave"):
    lv.RankLadder(per_octave=0)


def _stats(needed, capacity, shape=(16, 16, 8, 32)):
  needed = np.asarray(needed, np.int32)
  kept = np.minimum(needed, [c if c is not None else s
                             for c, s in zip(capacity, shape)])
  return lv.CompressionStats(
      needed_ranks=needed, kept_ranks=kept,
      kept_energy=np.ones(len(shape), np.float32),
      overflow=np.any(needed > kept), shape=shape, capacity=capacity,
      method="hosvd", itemsize=4, residual_nbytes=0)


def test_grows_at_once_and_shrinks_after_patience():
  ctl = lv.RankController(patience=3)
  assert ctl.key() is None
  # First observation sets capacities from the needs (rung above).
  assert ctl.observe({"a": _stats([5, 10, 2, 2], (8, 16, 4, 4))}) is False
  assert ctl.capacities["a"] == (6, 12, 2, 2)
  # A need above capacity: grow now, report a redo.
  assert ctl.observe({"a": _stats([7, 10, 2, 2], (6, 12, 2, 2))}) is True
  assert ctl.capacities["a"][0] == 8
  # Needs drop to fit a lower rung: nothing moves before `patience` steps.
  for _ in range(2):
    assert not ctl.observe({"a": _stats([3, 10, 2, 2], (8, 12, 2, 2))})
    assert ctl.capacities["a"][0] == 8
  ctl.observe({"a": _stats([4, 10, 2, 2], (8, 12, 2, 2))})
  assert ctl.capacities["a"][0] == 4     # the largest need seen, fitted
  # A need bouncing back inside the streak resets it.
  ctl.observe({"a": _stats([1, 10, 2, 2], (4, 12, 2, 2))})
  ctl.observe({"a": _stats([4, 10, 2, 2], (4, 12, 2, 2))})
  ctl.observe({"a": _stats([1, 10, 2, 2], (4, 12, 2, 2))})
  assert ctl.capacities["a"][0] == 4
  assert ctl.redos == 1
  assert len(ctl.history) == 3


def test_shrinks_wait_for_a_review_and_happen_together():
  """shrink_every: the shrinks of two layers whose streaks run out on
  different steps land on one review step, one setting; growing is never
  delayed."""
  ctl = lv.RankController(patience=2, shrink_every=4)
  observe = lambda need_a, need_b: ctl.observe(
      {"a": _stats(need_a, ctl.capacities.get("a", (8, 12, 2, 2))),
       "b": _stats(need_b, ctl.capacities.get("b", (8, 12, 2, 2)))})
  assert not observe([7, 10, 2, 2], [7, 10, 2, 2])          # the probe
  assert ctl.capacities == {"a": (8, 12, 2, 2), "b": (8, 12, 2, 2)}
  assert ctl.steps == 0                 # the probe is not a step
  assert not observe([3, 10, 2, 2], [7, 10, 2, 2])          # step 1
  assert not observe([3, 10, 2, 2], [3, 10, 2, 2])          # step 2
  assert not observe([3, 10, 2, 2], [3, 10, 2, 2])          # step 3
  # a's streak reached patience (2) at step 2, b's at step 3: both wait.
  assert ctl.capacities == {"a": (8, 12, 2, 2), "b": (8, 12, 2, 2)}
  assert not observe([3, 10, 2, 2], [3, 10, 2, 2])          # step 4: review
  assert ctl.capacities == {"a": (3, 12, 2, 2), "b": (3, 12, 2, 2)}
  assert ctl.steps == 4 and len(ctl.history) == 2   # one setting for both
  # A need above capacity still grows at once, between reviews; a step
  # redone is not counted twice.
  assert observe([5, 10, 2, 2], [3, 10, 2, 2])
  assert ctl.capacities["a"] == (6, 12, 2, 2) and ctl.steps == 4
  # The controller's whole state survives a checkpoint.
  restored = lv.RankController(patience=2, shrink_every=4)
  restored.load_state_dict(ctl.state_dict())
  assert restored.steps == 4 and restored.key() == ctl.key()
  for _ in range(4):                    # steps 5 to 8
    for c in (ctl, restored):
      c.observe({"a": _stats([1, 10, 2, 2], c.capacities["a"]),
                 "b": _stats([1, 10, 2, 2], c.capacities["b"])})
  assert restored.key() == ctl.key()
  assert ctl.capacities["a"] == (1, 12, 2, 2)     # shrank at step 8


def test_uncompressed_axes_stay_uncompressed():
  ctl = lv.RankController()
  ctl.observe({"s": _stats([5, 16, 8, 32], (8, None, None, None))})
  assert ctl.capacities["s"] == (6, None, None, None)


class _Net(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    cls = lvf.conv_cls(method="hosvd", eps=self.eps, on_overflow="ignore")
    x = lv.relu(nn.Conv(8, (3, 3), conv_general_dilated_cls=cls,
                        name="c1")(x))
    x = nn.Conv(4, (1, 1), conv_general_dilated_cls=cls, name="c2")(x)
    return jnp.mean(x ** 2)


def _drifting_batch(step, key):
  """8×8×8×3 images whose batch rank drifts 1 → 6 → 2 over the run."""
  rank = int(np.interp(step, [0, 15, 30], [1, 6, 2]))
  return _batch_of_rank(key, step, rank)


@functools.partial(jax.jit, static_argnames="rank")
def _batch_of_rank(key, step, rank):
  # Jitted: one compile per rank, not one per operation and shape.
  k1, k2 = jax.random.split(jax.random.fold_in(key, step))
  basis = jax.random.normal(k1, (rank, 8, 8, 3))
  mix = jax.random.normal(k2, (8, rank))
  return jnp.einsum("br,rhwc->bhwc", mix, basis)


def test_no_accepted_step_below_eps_and_few_compiles():
  eps = 0.95
  model = _Net(eps)
  key = jax.random.PRNGKey(0)
  params = jax.jit(model.init)(key, _drifting_batch(0, key))["params"]

  @functools.partial(jax.jit, static_argnames="capacities")
  def grads(params, x, capacities):
    with lv.rank_capacities(capacities):
      (_, state), g = jax.value_and_grad(
          lambda p: model.apply({"params": p}, x, mutable=["compression"]),
          has_aux=True)(params)
    return g, state["compression"]

  ctl = lv.RankController(patience=4)
  accepted_energy, steps = [], 30
  for step in range(steps):
    x = _drifting_batch(step, key)
    for _ in range(3):
      g, sown = grads(params, x, capacities=ctl.key())
      stats = lvf.collect_stats({"compression": sown})
      redo = ctl.observe(stats)
      if not redo:
        break
    assert not redo
    for s in stats.values():
      assert not bool(s.overflow)
      accepted_energy.append(float(jnp.min(s.kept_energy)))
    params = jax.tree_util.tree_map(lambda p, d: p - 0.01 * d, params, g)
  assert min(accepted_energy) >= eps - 1e-6
  assert set(ctl.capacities) == {"c1", "c2"}
  compiles = grads._cache_size()   # pylint: disable=protected-access
  assert compiles == len(ctl.history) + 1   # + the default-capacity first run
  assert compiles <= 10, ctl.history
  # Capacity followed the drift up and came back down.
  batch_caps = [h["c1"][0] for h in ctl.history]
  assert max(batch_caps) >= 6 and batch_caps[-1] < max(batch_caps)


def test_scope_overrides_capacity_by_layer_path():
  model = _Net(0.9)
  x = jnp.ones((4, 8, 8, 3)) + jax.random.normal(jax.random.PRNGKey(1),
                                                 (4, 8, 8, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]

  @jax.jit   # one compile, not the HOSVD's operations one by one
  def apply(params, x):
    with lv.rank_capacities({"c1": (1, 2, 2, 1)}):
      return model.apply({"params": params}, x, mutable=["compression"])[1]

  stats = lvf.collect_stats(apply(params, x))
  assert stats["c1"].capacity == (1, 2, 2, 1)
  assert stats["c2"].capacity != (1, 2, 2, 1)


@pytest.mark.parametrize("kwargs,name", [
    (dict(headroom=float("nan")), "headroom"),
    (dict(headroom=float("inf")), "headroom"),
    (dict(headroom=0.5), "headroom"),
    (dict(headroom="2"), "headroom"),
    (dict(patience=2.5), "patience"),
    (dict(patience="50"), "patience"),
    (dict(patience=True), "patience"),
    (dict(patience=0), "patience"),
    (dict(shrink_every=0), "shrink_every"),
    (dict(shrink_every=2.0), "shrink_every"),
    (dict(ladder=2), "ladder")])
def test_bad_settings_are_refused_when_made(kwargs, name):
  """nan/inf headroom failed later in observe(); 2.5 was truncated."""
  with pytest.raises(ValueError, match=name):
    lv.RankController(**kwargs)
