"""lowrank_vjp.training.loop: the rank controller's redo and fit."""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_vjp import training
from lowrank_vjp.training import loop

CONFIG = training.TrainConfig(steps=3, lr=0.05, warmup_steps=1)


@pytest.mark.parametrize("name,controlled", [
    ("vanilla", False), ("quant", False), ("hosvd", True), ("svd", True)])
def test_a_controller_only_for_eps_ranks(tiny, name, controlled):
  plan = tiny.plan(training.method_settings(name, eps=0.9))
  controller = training.make_controller(plan, patience=1, headroom=1.5)
  assert (controller is not None) is controlled


def _overflowing(tiny):
  # A tiny capacity that eps = 0.999 overflows.
  settings = training.method_settings(
      "hosvd", eps=0.999, method_kwargs={"rank_fraction": 0.1})
  plan = tiny.plan(settings)
  trained, frozen = plan.split(tiny.variables)
  tx = training.make_optimizer(CONFIG)
  fresh = lambda: training.initial_state(jax.tree.map(jnp.copy, trained), tx)
  return plan, frozen, tx, fresh


def test_an_overflowing_step_returns_its_state_unchanged(tiny):
  plan, frozen, tx, fresh = _overflowing(tiny)
  step = training.make_train_step(tiny.model, plan, tx, 0, None,
                                  donate=False, redo_on_overflow=True)
  state = fresh()
  new, metrics = step(state, frozen, tiny.x, tiny.labels)
  assert bool(metrics["overflow"])
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert bool(metrics["redo"])
  plain = training.make_train_step(tiny.model, plan, tx, 0, None,
                                   donate=False)
  applied, metrics = plain(state, frozen, tiny.x, tiny.labels)
  assert bool(metrics["overflow"]) and int(applied["step"]) == 1
  assert "redo" not in metrics
  # A controller needs the redo-capable step.
  controller = training.make_controller(plan, patience=10, headroom=1.0)
  with pytest.raises(ValueError, match="redo_on_overflow=True"):
    training.run_step(plain, controller, state, frozen, tiny.x, tiny.labels)


def test_run_step_redoes_an_overflowing_step_with_the_state_donated(tiny):
  # The controller grows the capacity and the step is recomputed from the
  # unchanged (donated, returned) state.
  plan, frozen, tx, fresh = _overflowing(tiny)
  controller = training.make_controller(plan, patience=10, headroom=1.0)
  step = training.make_train_step(tiny.model, plan, tx, 0, None,
                                  redo_on_overflow=True)
  programs = training.Programs(step, fresh(), frozen, tiny.x, tiny.labels)
  state = fresh()
  new, metrics = training.run_step(programs, controller, state, frozen,
                                   tiny.x, tiny.labels)
  assert controller.redos >= 1 and len(programs) >= 2
  assert state["step"].is_deleted()                          # donated
  assert int(new["step"]) == 1                               # applied once
  assert not bool(metrics["overflow"]) and not bool(metrics["redo"])
  assert not bool(np.any(np.asarray(metrics["stats"]["conv2"].overflow)))
  assert isinstance(metrics["loss"], np.ndarray)              # on the host
  # The same as one step at the grown capacity from the initial state.
  once, _ = programs(controller.key())(fresh(), frozen, tiny.x, tiny.labels)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(once)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Every program was compiled as it ran: donated.
  assert all(m.alias_bytes > 0 for m in programs.memory.values())


def test_the_first_controlled_step_is_a_probe_redone_at_fitted_capacity(tiny):
  # At full default capacity nothing overflows; the first call still only
  # measures, and the update is applied at the capacity fitted to the need.
  settings = training.method_settings(
      "hosvd", eps=0.5, method_kwargs={"rank_fraction": 1.0})
  plan = tiny.plan(settings)
  trained, frozen = plan.split(tiny.variables)
  tx = training.make_optimizer(CONFIG)
  fresh = lambda: training.initial_state(jax.tree.map(jnp.copy, trained), tx)
  step = training.make_train_step(tiny.model, plan, tx, 0, None,
                                  donate=False, redo_on_overflow=True)
  state = fresh()
  probed, metrics = step(state, frozen, tiny.x, tiny.labels)
  assert bool(metrics["redo"]) and not bool(metrics["overflow"])
  for a, b in zip(jax.tree.leaves(probed), jax.tree.leaves(state),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  full = metrics["stats"]["conv2"].capacity
  controller = training.make_controller(plan, patience=10, headroom=1.0)
  new, metrics = training.run_step(step, controller, fresh(), frozen,
                                   tiny.x, tiny.labels)
  assert int(new["step"]) == 1 and not bool(metrics["redo"])
  held = metrics["stats"]["conv2"].capacity
  assert held == dict(controller.key())["conv2"]
  assert np.prod(held) < np.prod(full)


@pytest.mark.parametrize("name", ["vanilla", "hosvd", "asi"])
def test_fit_over_batches(tiny, name):
  plan = tiny.plan(training.method_settings(name, eps=0.9))
  batches = [(tiny.x * (1 + 0.1 * i), tiny.labels) for i in range(3)]
  run = training.fit(tiny.model, plan, tiny.variables, batches, CONFIG,
                     seed=0, image_size=None)
  assert len(run.rows) == 3 and run.cached
  assert (run.controller is not None) is (name == "hosvd")
  assert (run.capacities() is None) is (name != "hosvd")
  for row in run.rows:
    assert np.isfinite(row["loss"]) and row["step_time_s"] > 0
    assert set(row["ranks"]) == {"conv2"}
  summary = training.summarise(run.rows)
  assert summary["analytic_peak_mib"] >= summary["analytic_mean_mib"] > 0
  assert int(run.state["step"]) == 3
  # fit copies what it trains: the caller's variables are untouched.
  assert not tiny.variables["params"]["head"]["kernel"].is_deleted()
  variables = training.final_variables(run.plan, run.state, run.frozen)
  accuracy = training.evaluate_arrays(tiny.model, variables, tiny.x,
                                      tiny.labels, batch=3)
  assert accuracy in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_evaluate_on_a_split_pads_the_last_batch(tiny):
  rng = np.random.default_rng(0)
  split = training.Split(
      [{"image": rng.integers(0, 256, (6, 6, 3), dtype=np.uint8),
        "label": i % 8} for i in range(7)], "image", "label", 8)
  step = training.make_eval_step(tiny.model, 6)
  got = training.evaluate(step, tiny.variables, split, image_size=6,
                          examples=0, batch_size=4)
  images, labels = split.get(np.arange(7), 6)
  from lowrank_vjp import models  # pylint: disable=g-import-not-at-top
  logits = tiny.model.apply(tiny.variables, models.preprocess(images, 6))
  want = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
  assert got == pytest.approx(want)
  assert training.evaluate(step, tiny.variables, split, image_size=6,
                           examples=3, batch_size=4) == pytest.approx(
                               float(np.mean(np.argmax(np.asarray(logits[:3]),
                                                       -1) == labels[:3])))


def test_evaluate_metrics_of_a_language_model_per_token():
  """Loss and accuracy over every token, the padded batch masked."""
  from lowrank_vjp import models  # pylint: disable=g-import-not-at-top
  from lowrank_vjp.training import text  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  split = text.TextSplit([{"bytes": rng.integers(0, 256, 1025, np.uint8)}],
                         seq_len=100)   # 10 examples
  model = models.GPT(vocab_size=256, block_size=100, n_layer=1, n_head=2,
                     n_embd=16)
  # Jitted (op by op, every operation of the GPT compiled on its own).
  variables = jax.jit(model.init)(jax.random.key(0),
                                  jnp.zeros((1, 100), jnp.int32))
  got = training.evaluate_metrics(training.make_eval_step(model, None),
                                  variables, split, image_size=None,
                                  examples=0, batch_size=4)
  x, y = split.get(np.arange(10))
  logits = jax.jit(model.apply)(variables, x)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  assert got["loss"] == pytest.approx(float(ce.mean()), rel=1e-5)
  assert got["accuracy"] == pytest.approx(float(np.mean(
      np.argmax(np.asarray(logits), -1) == y)))


def test_fit_raises_on_a_non_finite_loss(tiny):
  plan = tiny.plan(training.method_settings("vanilla"))
  batches = [(jnp.full_like(tiny.x, jnp.nan), tiny.labels)]
  with pytest.raises(FloatingPointError, match="non-finite"):
    training.fit(tiny.model, plan, tiny.variables, batches, CONFIG, seed=0,
                 image_size=None)


class _Gated:
  """A jitted step whose compile at ``blocked`` waits for ``gate``."""

  def __init__(self, step, gate, blocked):
    self.step, self.gate, self.blocked = step, gate, blocked

  def lower(self, *args, capacities=None):
    if capacities == self.blocked:
      self.gate.wait(timeout=60)
    return self.step.lower(*args, capacities=capacities)


def _setting(c0, c1):
  return (("a", (c0, None)), ("b", (c1, 2)))


def test_a_new_setting_runs_at_a_held_larger_one_while_it_compiles():
  """run_step(background=True)'s choice: a compiled setting that holds the
  new one in every mode, never one whose peak exceeds what ran, and the
  new setting itself (a wait) when none holds it."""

  @functools.partial(jax.jit, static_argnames="capacities")
  def step(x, capacities=None):
    size = sum(c for _, cap in capacities for c in cap if c is not None)
    return x * size, jnp.zeros(size * 4096)   # peak grows with capacity

  big, huge = _setting(8, 4), _setting(64, 64)
  small, wider = _setting(4, 2), _setting(4, 6)
  gate = threading.Event()
  programs = training.Programs(_Gated(step, gate, small), jnp.ones(3))
  programs(big)
  programs.count(big)                   # big ran a step; huge never does
  programs.prefetch(huge)
  programs.close()
  assert programs.ready(huge)
  try:
    assert loop._without_waiting(programs, small) == big
    assert not programs.ready(small)    # still compiling: nothing waited
    assert loop._without_waiting(programs, wider) == wider   # none holds it
    assert loop._without_waiting(programs, big) == big
    assert loop._without_waiting(programs, None) is None
  finally:
    gate.set()
  programs.close()
  assert programs.ready(small) and programs.ready(wider)
  assert loop._without_waiting(programs, small) == small


def test_background_compiles_leave_the_training_unchanged(tiny):
  """The same accepted updates whichever setting each step ran at: steps
  whose new (shrunk) setting was still compiling ran at the larger one."""
  plan = tiny.plan(training.method_settings("hosvd", eps=0.9))
  trained, frozen = plan.split(tiny.variables)
  tx = training.make_optimizer(CONFIG)
  step = training.make_train_step(tiny.model, plan, tx, 0, None,
                                  redo_on_overflow=True)
  # The batch rank falls, then rises a little: shrinks, and a small grow.
  rng = np.random.default_rng(0)
  basis = rng.normal(size=(4,) + tiny.x.shape[1:]).astype(np.float32)
  batch = lambda r: (np.einsum("br,r...->b...", rng.normal(
      size=(len(tiny.labels), r)).astype(np.float32), basis[:r]),
                     tiny.labels)
  batches = [batch(r) for r in (4, 4, 2, 2, 1, 1, 2, 2)]
  final = {}
  for background in (False, True):
    state = training.initial_state(jax.tree.map(jnp.copy, trained), tx)
    controller = training.make_controller(plan, patience=1, headroom=1.0)
    programs = training.Programs(step, state, frozen, *batches[0])
    for x, labels in batches:
      state, metrics = training.run_step(programs, controller, state, frozen,
                                         x, labels, background=background)
      assert not np.any(np.asarray(metrics["stats"]["conv2"].overflow))
      programs.close()     # background compiles finish before the next step
    final[background] = (state, programs)
  assert final[False][1].fallbacks == 0 and not final[False][1].prefetched
  assert final[True][1].fallbacks >= 1        # the shrinks ran larger
  assert len(final[True][1].prefetched) > final[True][1].fallbacks
  for a, b in zip(jax.tree.leaves(final[False][0]["params"]),
                  jax.tree.leaves(final[True][0]["params"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
