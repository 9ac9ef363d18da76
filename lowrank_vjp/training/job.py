"""One fine-tuning run of ``experiments/train.py``: resumable, reported.

:func:`train_one` fine-tunes one method end to end: builds the model and
plan, compiles the step ahead of time, restores the latest checkpoint if
there is one, trains with a progress bar (metrics as JSON lines, Orbax
checkpoints, the rank controller's redo), evaluates and writes
``report.json``. A re-run in the same ``workdir`` resumes bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

import lowrank_vjp.rules as lvr
from lowrank_vjp import models
from lowrank_vjp.training import evaluation as evaluate_lib
from lowrank_vjp.training import methods
from lowrank_vjp.training import nnx_step
from lowrank_vjp.training import precision
from lowrank_vjp.training import metrics as metrics_lib
from lowrank_vjp.training import programs as programs_lib
from lowrank_vjp.training import report as report_lib
from lowrank_vjp.training import step as step_lib
from lowrank_vjp.training.checkpoint import Checkpointer
from lowrank_vjp.training.config import TrainConfig
from lowrank_vjp.training.data import Split
from lowrank_vjp.training.loop import make_controller, timed_step
from lowrank_vjp.training.model import build_model, input_spec, make_rules
from lowrank_vjp.training.optim import make_optimizer


def _progress(config: TrainConfig, start: int, label: str):
  if config.no_progress:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=config.steps, initial=start, desc=label, unit="step",
              dynamic_ncols=True, file=sys.stdout)


def _labels_at(spec: models.ModelSpec, x_spec: jax.ShapeDtypeStruct,
               batch: int) -> jax.ShapeDtypeStruct:
  """The labels of a batch: one per example, or one per token."""
  per_token = spec.inputs == "tokens"
  shape = (batch, *x_spec.shape[1:]) if per_token else (batch,)
  return jax.ShapeDtypeStruct(shape, jnp.int32)


def train_one(config: TrainConfig, method: str, splits: Mapping[str, Split],
              workdir: str,
              log: Callable[[str], object] = print) -> dict[str, Any]:
  """Trains and evaluates one method; returns its report.

  Args:
    config: The job's settings (``config.method`` is not read: ``method``
      is the run).
    method: The run's method name (``"vanilla"``, ``"hosvd"``, …).
    splits: ``{"train": Split, "test": Split}``.
    workdir: Where ``metrics.jsonl``, ``ckpt/`` and ``report.json`` go.
    log: Called with progress messages.

  Returns:
    The report (:func:`~lowrank_vjp.training.make_report`, with
    ``rank_control`` when a controller ran), or ``{"interrupted_at": step}``
    when ``config.interrupt_at`` stopped it.

  Raises:
    FloatingPointError: on a non-finite loss.
  """
  settings = methods.settings_for(method, config)
  label = methods.run_label(method, settings)
  if (models.get_spec(config.model).blocks is not None
      and methods.is_checkpoint(method)):
    # Per-block remat of the whole block (model.neighbours), not the dense
    # layers' own checkpoint.
    settings = methods.method_settings(methods.VANILLA)
  os.makedirs(workdir, exist_ok=True)
  ckpt_dir = os.path.abspath(os.path.join(workdir, "ckpt"))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if config.fresh:
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    if os.path.exists(metrics_path):
      os.remove(metrics_path)

  train, test = splits["train"], splits["test"]
  num_classes = train.num_classes
  t0 = time.perf_counter()
  model, variables, spec, weights = build_model(config, num_classes, log,
                                                method)
  x_spec = input_spec(config, config.batch_size)
  image_size = None if spec.inputs == "tokens" else config.image_size
  tx = make_optimizer(config)
  if config.api == "nnx":
    nnx_job = nnx_step.nnx_training(config, num_classes, variables, x_spec,
                                    settings, tx, spec, method)
    plan, state, frozen = nnx_job.plan, nnx_job.state, nnx_job.frozen
  else:
    layers = lvr.discover(model, x_spec, variables=variables, train=True)
    plan = lvr.make_plan(layers, make_rules(config, layers, spec, settings))
    trained, frozen = plan.split(variables)
    state = step_lib.initial_state(trained, tx, step_lib.init_asi_state(
        model, plan, variables, x_spec, config.dtype), config.dtype)
  setup_time = time.perf_counter() - t0

  ckpt = Checkpointer(ckpt_dir, every=config.checkpoint_every)
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(start, like=state)
    log(f"[{label}] resumed from the checkpoint at step {start}")
  rows = metrics_lib.read_metrics(metrics_path, start)
  metrics_lib.write_metrics(metrics_path, rows)  # drops rows past the ckpt

  controller = (make_controller(plan, patience=config.rank_patience,
                                headroom=config.rank_headroom,
                                shrink_every=config.rank_shrink_every)
                if config.rank_control == "redo" else None)
  if config.api == "nnx":
    train_step = nnx_job.make_train_step(
        config.seed, image_size, redo_on_overflow=controller is not None)
  else:
    train_step = step_lib.make_train_step(
        model, plan, tx, config.seed, image_size,
        redo_on_overflow=controller is not None, dtype=config.dtype)
  ckpt.restore_controller(controller, start)
  batch = lambda step: train.get(train.batch_indices(
      step, config.batch_size, config.seed), image_size)
  images, labels = batch(0)
  compiled = programs_lib.Programs(train_step, state, frozen, images, labels)
  if config.api == "nnx":
    eval_step = nnx_job.make_eval_step(image_size)
    eval_variables = lambda state: (state["model"], frozen)
  else:
    eval_step = evaluate_lib.make_eval_step(
        model, image_size, precision.compute_dtype(config.dtype))
    eval_variables = lambda state: step_lib.final_variables(plan, state,
                                                            frozen)

  def held_out(state):
    return evaluate_lib.evaluate_metrics(
        eval_step, eval_variables(state), test,
        image_size=image_size, examples=config.eval_examples,
        batch_size=config.eval_batch_size)

  log(f"[{label}] {config.model}{' (NNX)' if config.api == 'nnx' else ''}, {len(plan.trainable)} trained layers "
      f"({len(plan.compressed)} through lowrank_vjp), batch "
      f"{tuple(x_spec.shape)}:\n" + plan.describe())
  bar = _progress(config, start, label)
  stop = (config.steps if config.interrupt_at is None
          else min(config.steps, config.interrupt_at))
  try:
    with metrics_lib.MetricsWriter(metrics_path) as writer:
      for step in range(start, stop):
        images, labels = batch(step)
        state, metrics, dt, compile_s = timed_step(
            compiled, controller, state, frozen, images, labels,
            background=config.rank_background_compile)
        loss = metrics_lib.check_finite(float(metrics["loss"]),
                                        f"at step {step} [{label}]")
        row = {"step": step + 1, "loss": loss,
               "train_accuracy": float(metrics["accuracy"]),
               "step_time_s": dt, "compile_time_s": compile_s,
               **metrics_lib.stats_row(metrics["stats"])}
        if "loss_scale" in metrics:  # float16: the scale and skipped steps
          row["loss_scale"] = float(metrics["loss_scale"])
          row["skipped"] = bool(metrics["skipped"])
        if (config.eval_every > 0 and (step + 1) % config.eval_every == 0
            and step + 1 < config.steps):
          m = held_out(state)
          row["val_loss"], row["val_accuracy"] = m["loss"], m["accuracy"]
        rows.append(row)
        writer.write(row)
        ckpt.save(step + 1, state, controller=controller)
        if bar is not None:
          mem = row["activation_memory_analytic_mib"]
          bar.set_postfix(loss=f"{loss:.3f}", mem=f"{mem:.2f}MiB")
          bar.update(1)
  finally:   # no compile left running behind a finished (or failed) run
    compiled.close(cancel=True)
  if bar is not None:
    bar.close()
  if stop < config.steps:
    if ckpt.latest_step() != stop:
      ckpt.save(stop, state, controller=controller, force=True)
    ckpt.wait()
    log(f"[{label}] interrupted at step {stop} (--interrupt-at)")
    return {"interrupted_at": stop}
  if ckpt.latest_step() != config.steps:
    ckpt.save(config.steps, state, controller=controller, force=True)
  ckpt.wait()

  t2 = time.perf_counter()
  held = held_out(state)
  eval_time = time.perf_counter() - t2
  report = report_lib.make_report(config, label, settings, plan, rows,
                                  compiled, held["accuracy"], weights,
                                  eval_time, setup_time, num_classes,
                                  val_loss=held["loss"])
  if config.max_batch_budget_mib > 0:
    key = controller.key() if controller is not None else None
    found = programs_lib.largest_batch(
        train_step, state, frozen,
        lambda b: (input_spec(config, b), _labels_at(spec, x_spec, b)),
        int(config.max_batch_budget_mib * metrics_lib.MiB), key,
        start=config.batch_size)
    report["max_batch"] = {"budget_mib": config.max_batch_budget_mib,
                           "batch": found.batch,
                           "peak_mib": found.peak_bytes / metrics_lib.MiB}
    log(f"[{label}] largest batch under {config.max_batch_budget_mib:g} "
        f"MiB: {found.batch}")
  if controller is not None:
    rc = report["rank_control"] = report_lib.rank_control_report(
        controller, compiled, rows)
    # What the layers hold before the controller has seen a step, and their
    # shapes: what lowrank_vjp.training.rank_replay needs (an abstract
    # trace of the probe, cached by jit).
    probe = jax.eval_shape(lambda *a: train_step(*a)[1]["stats"], state,
                           frozen, images, labels)
    rc["layer_shapes"] = {k: list(s.shape) for k, s in probe.items()}
    rc["initial_capacities"] = {k: list(s.capacity)
                                for k, s in probe.items()}
    rc["controller"] = {"per_octave": controller.ladder.per_octave,
                        "patience": controller.patience,
                        "headroom": controller.headroom,
                        "shrink_every": controller.shrink_every or 0,
                        "background_compile": config.rank_background_compile}
    log(f"[{label}] rank control: {rc['compiles']} compiles, "
        f"{rc['prefetched']} in the background, steps waited "
        f"{rc['compile_wait_s']:.1f} s for them and ran {rc['fallbacks']} "
        f"times at a larger setting meanwhile, {controller.redos} redone "
        f"steps, residual {rc['residual_mib_mean']:.3f} MiB vs eps-optimal "
        f"{rc['eps_optimal_mib_mean']:.3f} MiB (mean over steps)")
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report

