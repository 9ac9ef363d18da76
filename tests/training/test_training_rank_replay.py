"""lowrank_vjp.training.rank_replay: a controller over recorded needs, the
same decisions as in the run."""

from __future__ import annotations

import jax
import numpy as np

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


def test_replay_reproduces_a_real_run(tiny):
  plan = tiny.plan(training.method_settings("hosvd", eps=0.9))
  batches = [(tiny.x * (1 + 0.5 * i) + i, tiny.labels) for i in range(4)]
  config = training.TrainConfig(steps=4, lr=0.05, warmup_steps=1,
                                rank_patience=2)
  run = training.fit(tiny.model, plan, tiny.variables, batches, config,
                     seed=0, image_size=None)
  probe = jax.eval_shape(lambda *a: run.step_fn(*a)[1]["stats"],
                         run.state, run.frozen, *batches[0])
  shapes = {k: s.shape for k, s in probe.items()}
  initial = {k: s.capacity for k, s in probe.items()}
  controller = lv.RankController(patience=2)
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
