"""The training loop's core: one step with the rank controller's redo, and a
fit over given batches.

With HOSVD or SVD under ``jax.jit`` each layer holds a static capacity; a
:class:`lowrank_vjp.RankController` moves it with the ranks ε needs. When a
step needed more than its capacity, the step returned its state unchanged
(``redo_on_overflow``) and :func:`run_step` recomputes it at the grown
capacity, so the state stays donated whether a controller runs or not.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import lowrank_vjp as lv
import lowrank_vjp.rules as lvr
from lowrank_vjp._src.control import rank_controller
from lowrank_vjp.training import methods
from lowrank_vjp.training import metrics as metrics_lib
from lowrank_vjp.training import programs as programs_lib
from lowrank_vjp.training import step as step_lib
from lowrank_vjp.training.config import TrainConfig
from lowrank_vjp.training.optim import make_optimizer


def make_controller(plan: lvr.Plan, *, patience: int, headroom: float,
                    shrink_every: int = 0) -> lv.RankController | None:
  """A rank controller when ``plan`` compresses with ε-ranks, else None.

  Args:
    plan: The fine-tuning plan; a controller when one of its compressed
      layers keeps ε-ranks (:func:`~lowrank_vjp.training.uses_ranks`).
    patience: Steps before a capacity may shrink (hysteresis).
    headroom: Grow a capacity to the rung holding headroom × need.
    shrink_every: Shrink only at a review every this many steps, all layers
      together (0: each mode when its own patience runs out).

  Returns:
    A fresh :class:`lowrank_vjp.RankController`, or None.
  """
  if not any(methods.uses_ranks(s) for _, s in plan.compressed):
    return None
  return lv.RankController(patience=patience, headroom=headroom,
                           shrink_every=shrink_every or None)


def run_step(train_step, controller: lv.RankController | None, state,
             frozen, images, labels, max_tries: int = 4,
             background: bool = False):
  """One training step; ``(state, metrics)`` with concrete metrics.

  With a :class:`lowrank_vjp.RankController`, the step runs at
  ``controller.key()``; while some layer needed more than its capacity the
  step (built with ``redo_on_overflow=True``, so that it returned its input
  state unchanged, donated or not) is recomputed at the grown capacity, at
  most ``max_tries`` times. Before the controller has seen a step its key
  is None: that first call, at the configured capacities, is a probe (the
  step leaves the state unchanged) recomputed at the capacities the
  controller fits to its needs, so no update ever runs at the configured
  guess.

  Args:
    train_step: ``capacities -> compiled step``, e.g. a
      :class:`~lowrank_vjp.training.Programs`; or the jitted step of
      :func:`~lowrank_vjp.training.make_train_step` itself.
    controller: The rank controller, or None.
    state: The training state.
    frozen: The frozen variables.
    images: The batch's inputs.
    labels: The batch's labels.
    max_tries: Most computations of the step.
    background: With :class:`~lowrank_vjp.training.Programs`: a setting not
      compiled yet compiles in a background thread, and meanwhile the step
      runs at a compiled setting that holds at least as much in every mode
      of every layer (so it keeps the same ranks and computes the same
      update) and whose peak is no higher than a program that already ran;
      it waits only when there is none. After each step the setting one
      rung above (:meth:`lowrank_vjp.RankController.larger`) compiles in
      the background too, so that a grow finds one: the current setting
      holds a shrink, and the rung above a grow of up to one rung. False:
      every new setting is compiled before its step.

  Returns:
    The new state and the step's metrics on the host.

  Raises:
    RuntimeError: when the step still overflowed after ``max_tries`` tries.
  """
  background = (background and controller is not None
                and isinstance(train_step, programs_lib.Programs))
  key = None if controller is None else controller.key()
  for _ in range(max_tries):
    use = _without_waiting(train_step, key) if background else key
    state, metrics = _call(train_step, use, state, frozen, images, labels)
    metrics = jax.device_get(metrics)
    if controller is None:
      return state, metrics
    if "redo" not in metrics:
      raise ValueError(
          "run_step: with a rank controller the step must be built with "
          "make_train_step(..., redo_on_overflow=True), so that an "
          "overflowing step leaves its (donated) state unchanged.")
    controller.observe(metrics["stats"])
    if background:
      train_step.fallbacks += int(use != key)
    if not bool(metrics["redo"]):
      if background:   # what a grow of up to a rung will run at meanwhile
        train_step.prefetch(controller.larger())
      return state, metrics
    key = controller.key()
  raise RuntimeError(
      f"run_step: the step still needed more than its rank capacity after "
      f"{max_tries} tries; the state was left unchanged.")


def _without_waiting(programs: programs_lib.Programs, key):
  """``key`` when compiled; else starts its compile and returns a compiled
  setting that holds it, peaks no higher than what ran, and peaks least —
  or ``key`` itself (the call then waits) when there is none."""
  if key is None or programs.ready(key):
    return key
  programs.prefetch(key)
  want = dict(key)
  limit = programs.largest_peak().peak_bytes if programs.steps else None
  best = None
  for setting in programs.held_settings():
    if setting is None or not rank_controller.key_holds(setting, want):
      continue
    peak = programs.memory[setting].peak_bytes
    if limit is not None and peak > limit:
      continue
    if best is None or peak < programs.memory[best].peak_bytes:
      best = setting
  return key if best is None else best


def timed_step(programs: programs_lib.Programs, controller, state, frozen,
               images, labels, background: bool = False):
  """:func:`run_step`, timed without the compilations it waited for.

  Args:
    programs: The compiled programs.
    controller: The rank controller, or None.
    state: The training state.
    frozen: The frozen variables.
    images: The batch's inputs.
    labels: The batch's labels.
    background: Compile new capacity settings in the background
      (:func:`run_step`).

  Returns:
    ``(state, metrics, step seconds, compile seconds)``: the step's wall
    time less the time it waited for compiles (a new capacity setting, or a
    redo at one), and that wait.
  """
  before = programs.wait_s
  t = time.perf_counter()
  state, metrics = run_step(programs, controller, state, frozen, images,
                            labels, background=background)
  waited = programs.wait_s - before
  return state, metrics, time.perf_counter() - t - waited, waited


def _call(train_step, key, *args):
  if isinstance(train_step, programs_lib.Programs):
    train_step.count(key)
    return train_step(key)(*args)
  if hasattr(train_step, "lower"):  # the jitted step: capacities static
    return train_step(*args, capacities=key)
  return train_step(*args)  # a compiled program (its capacities are fixed)


@dataclasses.dataclass
class Run:
  """A finished :func:`fit`: what it trained and what each step measured.

  Attributes:
    plan: The fine-tuning plan.
    state: The final training state.
    frozen: The frozen variables.
    rows: Per step: ``loss``, ``step_time_s`` and
      :func:`~lowrank_vjp.training.stats_row`'s figures.
    controller: The rank controller, or None.
    step_fn: The jitted training step.
    tx: The optimizer.
    cached: Whether the inputs were cached features.
    programs: The compiled programs that ran (compile time and XLA memory
      per capacity setting).
  """

  plan: lvr.Plan
  state: dict
  frozen: dict
  rows: list[dict]
  controller: lv.RankController | None
  step_fn: Any
  tx: Any
  cached: bool
  programs: programs_lib.Programs | None = None

  def capacities(self):
    """The controller's last capacities (``capacities=`` of the step)."""
    return None if self.controller is None else self.controller.key()


def fit(model, plan: lvr.Plan, variables, batches: Sequence[tuple],
        config: TrainConfig, *, seed: int, image_size: int | None) -> Run:
  """Trains ``plan`` on ``batches``: train.py's loop without checkpoints.

  Args:
    model: The Linen model, or a
      :class:`~lowrank_vjp.training.cached_features.FromBlock` for cached
      features.
    plan: The fine-tuning plan.
    variables: The model's variables (not modified: the state is a copy).
    batches: ``[(inputs, labels)]``, one per step.
    config: The optimizer, schedule and rank control (``steps`` sets the
      schedule's length).
    seed: Seed of the dropout keys.
    image_size: Side of the images, or None when ``batches`` hold features.

  Returns:
    The :class:`Run`.

  Raises:
    FloatingPointError: on a non-finite loss.
  """
  trained, frozen = plan.split(variables)
  trained = jax.tree.map(jnp.copy, trained)  # the step donates its state
  tx = make_optimizer(config)
  x0 = (batches[0][0] if image_size is None else jax.ShapeDtypeStruct(
      (len(batches[0][1]), image_size, image_size, 3), jnp.float32))
  state = step_lib.initial_state(trained, tx, step_lib.init_asi_state(
      model, plan, variables, x0))
  controller = make_controller(plan, patience=config.rank_patience,
                               headroom=config.rank_headroom,
                               shrink_every=config.rank_shrink_every)
  step_fn = step_lib.make_train_step(model, plan, tx, seed, image_size,
                                     redo_on_overflow=controller is not None)
  first_x, first_labels = batches[0]
  compiled = programs_lib.Programs(step_fn, state, frozen, first_x,
                                   first_labels)
  rows = []
  try:
    for x, labels in batches:
      state, metrics, dt, compile_s = timed_step(
          compiled, controller, state, frozen, x, labels,
          background=config.rank_background_compile)
      loss = metrics_lib.check_finite(float(metrics["loss"]))
      rows.append({"loss": loss, "step_time_s": dt,
                   "compile_time_s": compile_s,
                   **metrics_lib.stats_row(metrics["stats"])})
  finally:   # no compile left running behind a finished (or failed) run
    compiled.close(cancel=True)
  return Run(plan, state, frozen, rows, controller, step_fn, tx,
             image_size is None, compiled)
