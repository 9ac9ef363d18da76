"""lowrank_vjp.training.rank_replay: a controller over recorded needs, the
same decisions as in the run."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import lowrank_vjp as lv
from lowrank_vjp import training
from lowrank_vjp._src.tensor import tucker
from lowrank_vjp.training import rank_replay

SHAPE = (8, 6, 6, 16)
INITIAL = {"a": (4, 3, 3, 8)}


def test_probe_applies_no_step_at_the_configured_capacity():
  needs = [{"a": [2, 2, 2, 3]}] * 5
  probe = rank_replay.replay(needs, {"a": SHAPE}, INITIAL,
                             lv.RankController(), probe=True)
  applied = rank_replay.replay(needs, {"a": SHAPE}, INITIAL,
                               lv.RankController(), probe=False)
  assert probe.capacities[0]["a"] == (2, 2, 2, 3)   # rungs holding the need
  assert applied.capacities[0]["a"] == INITIAL["a"]
  assert probe.redone_calls == 1 and applied.redone_calls == 0
  assert probe.compiles == applied.compiles == 2
  assert probe.residual_over_optimal == 1.0
  first = tucker.tucker_nbytes(SHAPE, INITIAL["a"], 4, 4)
  need = tucker.tucker_nbytes(SHAPE, (2, 2, 2, 3), 4, 4)
  assert np.isclose(applied.residual_over_optimal,
                    (first + 4 * need) / (5 * need))


def test_an_overflow_is_redone_and_counted():
  needs = [{"a": [2, 2, 2, 3]}, {"a": [5, 2, 2, 3]}, {"a": [2, 2, 2, 3]}]
  r = rank_replay.replay(needs, {"a": SHAPE}, INITIAL,
                         lv.RankController(patience=100))
  assert [c["a"][0] for c in r.capacities] == [2, 6, 6]  # up at once, down
  assert r.redone_calls == 2 and r.compiles == 3          # only after 100


def test_background_compiles_remove_the_waits_after_the_first_steps():
  """Needs that settle, fall (a shrink) and rise (a grow): with every
  compile waited for, each new setting stalls its step; in the background
  only the first two do (the probe's and the fitted setting's); the others
  run at the smallest ready setting that holds them while they compile."""
  shapes = {"a": SHAPE}
  needs = ([{"a": [6, 2, 2, 3]}] * 6 + [{"a": [2, 2, 2, 3]}] * 6
           + [{"a": [3, 2, 2, 3]}] * 8)
  waited = rank_replay.replay(needs, shapes, INITIAL,
                              lv.RankController(patience=3))
  background = rank_replay.replay(needs, shapes, INITIAL,
                                  lv.RankController(patience=3),
                                  background_steps=2)
  assert (waited.compiles, waited.stalls, waited.fallbacks) == (4, 4, 0)
  assert [c["a"][0] for c in waited.capacities] == [6] * 9 + [2] * 3 + [3] * 8
  # The shrink to 2 (decided at step 8) compiles over steps 9-10, which run
  # at 6; the grow to 3 at step 12 compiles over steps 12-13, which run at
  # 6 again (fewer bytes than (3, 3, 3, 4), the rung above 2 in every mode).
  assert [c["a"][0] for c in background.capacities] == (
      [6] * 11 + [2] + [6] * 2 + [3] * 6)
  assert (background.stalls, background.fallbacks) == (2, 4)
  # None, 6, 2, 3 and the rung above each of the last three
  assert background.compiles == 7 and background.background == 6
  assert background.residual_over_optimal > waited.residual_over_optimal


@pytest.mark.parametrize("shrink_every", [0, 2])
def test_replay_reproduces_a_real_run(tiny, shrink_every):
  plan = tiny.plan(training.method_settings("hosvd", eps=0.9))
  batches = [(tiny.x * (1 + 0.5 * i) + i, tiny.labels) for i in range(4)]
  config = training.TrainConfig(steps=4, lr=0.05, warmup_steps=1,
                                rank_patience=2,
                                rank_shrink_every=shrink_every,
                                rank_background_compile=False)
  run = training.fit(tiny.model, plan, tiny.variables, batches, config,
                     seed=0, image_size=None)
  probe = jax.eval_shape(lambda *a: run.step_fn(*a)[1]["stats"],
                         run.state, run.frozen, *batches[0])
  shapes = {k: s.shape for k, s in probe.items()}
  initial = {k: s.capacity for k, s in probe.items()}
  controller = lv.RankController(patience=2,
                                 shrink_every=shrink_every or None)
  r = rank_replay.replay([row["ranks"] for row in run.rows], shapes,
                         initial, controller)
  assert r.compiles == len(run.programs)
  assert controller.capacities == run.controller.capacities
  assert controller.redos == run.controller.redos
  for caps, row in zip(r.capacities, run.rows, strict=True):
    held = sum(tucker.tucker_nbytes(shapes[k], c, 4, 4)
               for k, c in caps.items())
    np.testing.assert_allclose(held / training.MiB,
                               row["activation_memory_capacity_mib"],
                               rtol=1e-9)
