"""lowrank_vjp.training.plots: the experiments' PNGs."""

from __future__ import annotations

import os

import pytest

from lowrank_vjp import training
from lowrank_vjp.training import plots

pytest.importorskip("matplotlib")


def _runs(tmp_path, layers, runs, rows):
  run_dirs, reports = {}, []
  for run, settings, val_loss in runs:
    d = tmp_path / run
    d.mkdir()
    training.write_metrics(str(d / "metrics.jsonl"), rows(run))
    run_dirs[run] = str(d)
    reports.append({"run": run, "model": "m", "dataset": "d",
                    "layers": layers, "accuracy": 0.5, "steps": 2,
                    "settings": settings, "val_loss": val_loss,
                    "activation_memory_analytic_peak_mib": 1.0})
  return reports, run_dirs


def test_plot_runs_writes_both_figures(tmp_path):
  layers = ["a/conv", "b/conv"]
  reports, run_dirs = _runs(
      tmp_path, layers, [("vanilla", {"method": "none"}, None),
                         ("hosvd(eps=0.8)", {"method": "hosvd"}, None)],
      lambda run: [{"step": s, "ranks": {p: [s, 2, 3, 4] for p in layers}}
                   for s in (1, 2)])
  paths = training.plot_runs(reports, str(tmp_path), run_dirs)
  assert [os.path.basename(p) for p in paths] == ["accuracy_vs_memory.png",
                                                  "ranks.png"]
  assert all(os.path.getsize(p) > 1000 for p in paths)


def test_validation_loss_curves_and_plot(tmp_path):
  """Evaluations during training plus the final one, per run; ranks only
  for the runs that have ε-ranks (none here: no ranks.png)."""
  layers = ["h_0/mlp/c_fc"]
  reports, run_dirs = _runs(
      tmp_path, layers, [("vanilla", {"method": "none"}, 2.0),
                         ("quant", {"method": "quant"}, 2.1)],
      lambda run: [{"step": 1, "val_loss": 3.0 if run == "quant" else 2.9,
                    "ranks": {layers[0]: [4, 8, 16]}},
                   {"step": 2, "ranks": {layers[0]: [4, 8, 16]}}])
  curves = plots.val_loss_curves(reports, run_dirs)
  assert curves == {"vanilla": ([1, 2], [2.9, 2.0]),
                    "quant": ([1, 2], [3.0, 2.1])}
  paths = training.plot_runs(reports, str(tmp_path), run_dirs)
  assert [os.path.basename(p) for p in paths] == ["accuracy_vs_memory.png",
                                                  "val_loss.png"]
  # A single evaluation per run draws no curve.
  single = [dict(reports[0], val_loss=None)]
  assert plots.val_loss_curves(single, run_dirs) == {"vanilla": ([1], [2.9])}
  assert plots.plot_val_loss(single, str(tmp_path), run_dirs) is None


def test_plot_compression(tmp_path):
  entry = lambda method, rate: {"method": method, "accuracy": 0.9,
                                "compression": {"compression_rate": rate}}
  results = {"full": entry("full", 0.0), "tdlrt_tau=0.1": entry("tdlrt", 0.5),
             "tucker_tau=0.1": entry("tucker", 0.5),
             "full+hosvd": entry("full", 0.0)}
  path = str(tmp_path / "tdlrt.png")
  assert plots.plot_compression(results, path) == path
  assert os.path.getsize(path) > 1000
