"""lowrank_vjp.training.report: run reports and the comparison table."""

from __future__ import annotations

import json

import pytest

import lowrank_vjp as lv
from lowrank_vjp import training


def _rows(plan, n=3):
  return [{"step": s + 1, "loss": 2.0 - s, "train_accuracy": 0.1 * s,
           "step_time_s": 0.01 * (s + 1),
           "activation_memory_analytic_mib": 1.0 + s,
           "activation_memory_vanilla_mib": 8.0,
           "activation_memory_capacity_mib": 4.0,
           "ranks": {p: [s + 1, 2, 3, 4] for p in plan.compressed_paths},
           "overflow_layers": int(s == 1)} for s in range(n)]


def test_make_report_fields(tiny):
  settings = training.method_settings("hosvd", eps=0.8)
  plan = tiny.plan(settings)
  config = training.TrainConfig(dataset="sklearn_digits", steps=3)
  programs = training.Programs(None)  # two settings, filled by hand
  programs.memory = {
      None: lv.measure.XlaMemory(2**20, 2**20, 5 * 2**20, 0, "cpu"),
      "grown": lv.measure.XlaMemory(2**20, 2**20, 3 * 2**20, 0, "cpu")}
  programs.compile_s = {None: 0.25, "grown": 0.75}
  programs._compiled = dict.fromkeys(programs.memory)  # pylint: disable=protected-access
  programs.steps.update({None: 1, "grown": 2})
  report = training.make_report(
      config, "hosvd(eps=0.8)", settings, plan, _rows(plan), programs, 0.5,
      None, 2.0, 3.0, 8)
  json.dumps(report)
  assert report["method"] == "hosvd" and report["settings"] == settings
  assert report["activation_memory_analytic_peak_mib"] == 3.0
  assert report["activation_memory_analytic_mean_mib"] == 2.0
  assert report["overflow_steps"] == 1 and report["final_loss"] == 0.0
  # The program that ran the most steps; the largest peak and the compile
  # time over all of them.
  assert report["xla_temp_mib"] == 3.0 and report["pretrained"] is False
  assert report["xla_peak_mib"] == 5.0 and report["xla_peak_max_mib"] == 7.0
  assert report["compile_time_s"] == 1.0 and report["xla_programs"] == 2
  assert report["step_time_median_s"] == pytest.approx(0.02)
  assert report["ranks"]["conv2"] == {"shape": [4, 6, 6, 8],
                                      "final": [3, 2, 3, 4],
                                      "max": [3, 2, 3, 4],
                                      "mean": [2.0, 2.0, 3.0, 4.0]}
  vanilla = training.make_report(
      config, "vanilla", {"method": "none"}, plan, _rows(plan), programs,
      0.5, None, 2.0, 3.0, 8)
  assert vanilla["method"] == "vanilla"
  assert vanilla["dtype"] == "float32" and vanilla["skipped_steps"] is None
  # float16: the rows carry the loss scale; skipped steps are counted.
  rows = _rows(plan)
  for i, r in enumerate(rows):
    r["loss_scale"], r["skipped"] = 2.0 ** (15 - i), i > 0
  half = training.make_report(
      config.replace(dtype="float16"), "vanilla", {"method": "none"}, plan,
      rows, programs, 0.5, None, 2.0, 3.0, 8)
  assert half["dtype"] == "float16"
  assert half["skipped_steps"] == len(rows) - 1
  assert half["final_loss_scale"] == 2.0 ** (16 - len(rows))


def test_table_has_one_line_per_run():
  reports = [{"run": r, "accuracy": 0.5, "val_loss": loss,
              "activation_memory_analytic_peak_mib": 1.0,
              "activation_memory_analytic_mean_mib": 0.5,
              "activation_memory_vanilla_mib": 2.0, "xla_peak_mib": 3.0,
              "step_time_median_s": t}
             for r, loss, t in (("vanilla", 1.25, 0.01),
                                ("hosvd", None, 0.03))]
  lines = training.table(reports).splitlines()
  assert len(lines) == 4 and "top-1 %" in lines[0]
  assert "XLA peak MiB" in lines[0] and "val loss" in lines[0]
  assert lines[2].split()[:3] == ["vanilla", "50.00", "1.2500"]
  # The step time over the first run's, and a missing loss shown as nan.
  assert lines[3].split()[2] == "nan" and lines[3].split()[-1] == "3.00"


def test_environment_is_stamped():
  env = training.environment()
  assert {"date", "device", "machine", "jax", "flax", "python"} <= set(env)
