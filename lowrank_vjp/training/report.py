"""Reports of finished runs: one JSON-ready dict per run, and a table."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

import lowrank_vjp as lv
import lowrank_vjp.rules as lvr
from lowrank_vjp import models
from lowrank_vjp.training import methods
from lowrank_vjp.training.config import TrainConfig
from lowrank_vjp.training.metrics import MiB


def compiled_memory(compiled) -> lv.measure.XlaMemory:
  """XLA's memory figures of a compiled step.

  Args:
    compiled: ``jax.jit(f).lower(...).compile()``.

  Returns:
    Its argument, output, temp and alias bytes, on the default device.
  """
  m = compiled.memory_analysis()
  return lv.measure.XlaMemory(
      int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
      int(m.temp_size_in_bytes), int(m.alias_size_in_bytes),
      jax.devices()[0].device_kind)


def environment() -> dict[str, str]:
  """Machine, versions and date, to stamp on result files."""
  import flax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {
      "date": datetime.date.today().isoformat(),
      "device": f"{device.platform}:{device.device_kind}",
      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
      "jax": jax.__version__, "flax": flax.__version__,
      "python": platform.python_version(),
  }


def _ranks(plan: lvr.Plan, rows: Sequence[Mapping]) -> dict[str, dict]:
  ranks = {}
  for path in plan.compressed_paths:
    history = np.asarray([r["ranks"][path] for r in rows if path in
                          r["ranks"]])
    layer = plan.layer(path)
    ranks[path] = {
        "shape": list(layer.input_shape),
        "final": history[-1].tolist() if len(history) else None,
        "max": history.max(0).tolist() if len(history) else None,
        "mean": np.round(history.mean(0), 2).tolist() if len(history)
                else None,
    }
  return ranks


def make_report(config: TrainConfig, label: str, settings: Mapping[str, Any],
                plan: lvr.Plan, rows: Sequence[Mapping], programs,
                accuracy: float, weights: str | None, eval_time: float,
                setup_time: float, num_classes: int, *,
                val_loss: float | None = None) -> dict[str, Any]:
  """The ``report.json`` of one fine-tuning run.

  Args:
    config: The job's settings.
    label: The run's name (:func:`~lowrank_vjp.training.run_label`).
    settings: The compressed layers' settings.
    plan: The fine-tuning plan.
    rows: The per-step metrics (``metrics.jsonl``).
    programs: The :class:`~lowrank_vjp.training.Programs` that ran.
    accuracy: Test top-1 accuracy.
    weights: The pretrained weights file, or None.
    eval_time: Seconds spent evaluating.
    setup_time: Seconds spent building the model and plan.
    num_classes: Classes of the dataset (a language model's vocabulary).
    val_loss: Mean held-out cross-entropy (per token for a language model).

  Returns:
    The report: the run's settings, accuracy, ``activation_memory_*``
    (the papers' analytic count: peak and mean over training, MiB),
    ``xla_*`` (the compiled step that ran the most steps, as it ran:
    donated, at its capacities; ``xla_peak_max_mib`` over every program the
    run compiled), ``step_time_*`` (without compilation: ``compile_time_s``
    is apart) and ``ranks`` per layer.
  """
  mem = np.asarray([r["activation_memory_analytic_mib"] for r in rows])
  times = np.asarray([r["step_time_s"] for r in rows])
  xla = programs.most_run()
  last = rows[-1] if rows else {}
  pct = lambda q: float(np.percentile(times, q)) if len(times) else None
  return {
      "run": label,
      "model": config.model,
      "api": config.api,
      "dtype": config.dtype,
      "pretrained": weights is not None,
      "weights": weights,
      "method": (methods.VANILLA if label == methods.VANILLA
                 else methods.method_name(settings)),
      "settings": dict(settings),
      "layers": list(plan.compressed_paths),
      "trained_layers": list(plan.trainable),
      "train_bn": list(plan.train_bn),
      "dataset": config.dataset,
      "num_classes": num_classes,
      "image_size": config.image_size,
      "batch_size": config.batch_size,
      "steps": config.steps,
      "optimizer": config.optimizer,
      "lr": config.lr,
      "seed": config.seed,
      "accuracy": accuracy,
      "val_loss": val_loss,
      "seq_len": (config.seq_len
                  if models.get_spec(config.model).inputs == "tokens"
                  else None),
      "model_kwargs": json.loads(config.model_kwargs),
      "scan": config.scan,
      "eval_examples": config.eval_examples,
      # float16 runs: steps skipped by the loss scale, and its last value
      "skipped_steps": (sum(bool(r.get("skipped")) for r in rows)
                        if "loss_scale" in last else None),
      "final_loss_scale": last.get("loss_scale"),
      "final_loss": last.get("loss"),
      "final_train_accuracy": last.get("train_accuracy"),
      "activation_memory_analytic_peak_mib": float(mem.max()) if len(mem)
                                             else None,
      "activation_memory_analytic_mean_mib": float(mem.mean()) if len(mem)
                                             else None,
      "activation_memory_vanilla_mib": last.get(
          "activation_memory_vanilla_mib"),
      "activation_memory_capacity_mib": last.get(
          "activation_memory_capacity_mib"),
      "overflow_steps": int(sum(1 for r in rows if r["overflow_layers"])),
      "xla_device": xla.device,
      "xla_temp_mib": xla.temp_bytes / MiB,
      "xla_peak_mib": xla.peak_bytes / MiB,
      "xla_argument_mib": xla.argument_bytes / MiB,
      "xla_output_mib": xla.output_bytes / MiB,
      "xla_alias_mib": xla.alias_bytes / MiB,
      "xla_peak_max_mib": programs.largest_peak().peak_bytes / MiB,
      "xla_programs": len(programs),
      "step_time_mean_s": float(times.mean()) if len(times) else None,
      "step_time_median_s": pct(50),
      "step_time_p90_s": pct(90),
      "compile_time_s": programs.compile_time,
      "setup_time_s": setup_time,
      "eval_time_s": eval_time,
      "ranks": _ranks(plan, rows),
  }


def rank_control_report(controller: lv.RankController, programs,
                        rows: Sequence[Mapping]) -> dict[str, Any]:
  """What the rank controller did over a run (``report["rank_control"]``).

  Args:
    controller: The run's controller.
    programs: The :class:`~lowrank_vjp.training.Programs` that ran.
    rows: The per-step metrics.

  Returns:
    Compiles, their seconds (in the background too) and the seconds steps
    waited for them, the settings compiled in the background and the calls
    run at a larger compiled setting while theirs compiled,
    capacity settings, redone steps, the residual held against the
    ε-optimal one (MiB, mean over steps) and the final capacities.
  """
  capacity = [r["activation_memory_capacity_mib"] for r in rows]
  optimal = [r["activation_memory_analytic_mib"] for r in rows]
  return {
      "compiles": len(programs),
      "compile_time_s": programs.compile_time,
      "compile_wait_s": programs.wait_s,
      "prefetched": len(programs.prefetched),
      "fallbacks": programs.fallbacks,
      "capacity_settings": len(controller.history),
      "redone_steps": controller.redos,
      "residual_mib_mean": float(np.mean(capacity)),
      "eps_optimal_mib_mean": float(np.mean(optimal)),
      "residual_over_optimal": float(np.mean(capacity) / max(
          np.mean(optimal), 1e-12)),
      "final_capacities": {k: list(v) for k, v in
                           controller.capacities.items()},
  }


def summarise(rows: Sequence[Mapping]) -> dict[str, float]:
  """Memory and time of a :func:`~lowrank_vjp.training.fit`'s rows.

  Returns:
    ``analytic_peak_mib``, ``analytic_mean_mib``, ``vanilla_mib``,
    ``capacity_mib`` and ``step_time_median_s`` (without the first,
    compiling step when there are more).
  """
  mem = np.asarray([r["activation_memory_analytic_mib"] for r in rows])
  return {
      "analytic_peak_mib": float(mem.max()),
      "analytic_mean_mib": float(mem.mean()),
      "vanilla_mib": rows[-1]["activation_memory_vanilla_mib"],
      "capacity_mib": rows[-1]["activation_memory_capacity_mib"],
      "step_time_median_s": float(np.median([r["step_time_s"]
                                             for r in rows[1:] or rows])),
  }


def table(reports: Sequence[Mapping]) -> str:
  """The comparison table train.py prints: accuracy, held-out loss, memory,
  step time (and its ratio to the first run's, measured in the same job).
  """
  head = (f"{'run':<22} {'top-1 %':>8} {'val loss':>8} {'act. MiB peak':>13} "
          f"{'act. MiB mean':>13} {'vanilla MiB':>11} {'XLA peak MiB':>12} "
          f"{'step ms':>8} {'x first':>7}")
  lines = [head, "-" * len(head)]
  first = reports[0]["step_time_median_s"] if reports else None
  for r in reports:
    loss = r.get("val_loss")
    ratio = (r["step_time_median_s"] / first if first else float("nan"))
    lines.append(
        f"{r['run']:<22} {100 * r['accuracy']:>8.2f} "
        f"{loss if loss is not None else float('nan'):>8.4f} "
        f"{r['activation_memory_analytic_peak_mib']:>13.3f} "
        f"{r['activation_memory_analytic_mean_mib']:>13.3f} "
        f"{r['activation_memory_vanilla_mib']:>11.3f} "
        f"{r['xla_peak_mib']:>12.2f} {1000 * r['step_time_median_s']:>8.1f} "
        f"{ratio:>7.2f}")
  return "\n".join(lines)
