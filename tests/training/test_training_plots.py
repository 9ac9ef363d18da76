"""lowrank_vjp.training.plots: the experiments' PNGs."""

from __future__ import annotations

import os

import pytest

from lowrank_vjp import training
from lowrank_vjp.training import plots

pytest.importorskip("matplotlib")


def test_plot_runs_writes_both_figures(tmp_path):
  layers = ["a/conv", "b/conv"]
  run_dirs = {}
  reports = []
  for run in ("vanilla", "hosvd(eps=0.8)"):
    d = tmp_path / run
    d.mkdir()
    training.write_metrics(str(d / "metrics.jsonl"), [
        {"step": s, "ranks": {p: [s, 2, 3, 4] for p in layers}}
        for s in (1, 2)])
    run_dirs[run] = str(d)
    reports.append({"run": run, "model": "m", "dataset": "d",
                    "layers": layers, "accuracy": 0.5,
                    "activation_memory_analytic_peak_mib": 1.0})
  paths = training.plot_runs(reports, str(tmp_path), run_dirs)
  assert [os.path.basename(p) for p in paths] == ["accuracy_vs_memory.png",
                                                  "ranks.png"]
  assert all(os.path.getsize(p) > 1000 for p in paths)


def test_plot_compression(tmp_path):
  entry = lambda method, rate: {"method": method, "accuracy": 0.9,
                                "compression": {"compression_rate": rate}}
  results = {"full": entry("full", 0.0), "tdlrt_tau=0.1": entry("tdlrt", 0.5),
             "tucker_tau=0.1": entry("tucker", 0.5),
             "full+hosvd": entry("full", 0.0)}
  path = str(tmp_path / "tdlrt.png")
  assert plots.plot_compression(results, path) == path
  assert os.path.getsize(path) > 1000
