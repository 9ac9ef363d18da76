"""experiments/peak_memory.py --resume: a stopped run is finished, not redone."""

from __future__ import annotations

import json
import os

import lowrank_vjp as lv
from lowrank_vjp.training import peak_memory as pm

# --quick measures resnet18 k = 4 at 32 px, batch 2, under 160 MiB.
QUICK = pm.Setting("resnet18", "4", 32).label()
MIB = int(pm.MiB)


def _stopped_run(out, with_max_batch):
  """A peak_memory.json as a run that stopped part-way leaves it."""
  result = {
      "environment": {"date": "2026-01-01", "device": "cpu:cpu",
                      "machine": "x86_64", "jax": "0", "flax": "0",
                      "python": "3"},
      "command": "python experiments/peak_memory.py --quick --no-cnn",
      "wall_s": 600.0, "partial": True,
      "peaks": [{"setting": QUICK, "batch": 2,
                 "peak_bytes": {"vanilla": 30 * MIB, "hosvd": 20 * MIB}}],
      "max_batch": []}
  if with_max_batch:
    result["max_batch"].append({
        "setting": QUICK, "budget_bytes": 160 * MIB, "tolerance": 0.1,
        "batch": {"vanilla": 8, "hosvd": 12},
        "peak_bytes": {"vanilla": 150 * MIB, "hosvd": 155 * MIB},
        "compiles": {"vanilla": 4, "hosvd": 5}})
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "peak_memory.json"), "w") as f:
    json.dump(result, f)


def _no_compiles(*args, **kwargs):
  raise AssertionError("a table the stopped run had was measured again")


def test_resume_measures_only_the_missing_tables(script, tmp_path,
                                                 monkeypatch):
  out = str(tmp_path)
  _stopped_run(out, with_max_batch=False)
  searched = []

  def fake_max_batches(setting, names, budget_bytes, **kwargs):
    searched.append((setting.label(), tuple(names), budget_bytes))
    return {n: lv.measure.MaxBatch(4 + i, (100 + i) * MIB, budget_bytes,
                                   {4 + i: (100 + i) * MIB})
            for i, n in enumerate(names)}

  monkeypatch.setattr(pm, "peak_bytes", _no_compiles)
  monkeypatch.setattr(pm, "max_batches", fake_max_batches)
  result = script("peak_memory").main(
      ["--quick", "--no-cnn", "--resume", "--out", out])
  assert searched == [(QUICK, ("vanilla", "hosvd"), 160 * MIB)]
  assert result["peaks"][0]["peak_bytes"]["hosvd"] == 20 * MIB   # kept
  assert result["max_batch"][0]["batch"] == {"vanilla": 4, "hosvd": 5}
  assert not result["partial"]
  assert result["wall_s"] >= 600.0            # the stopped run's time too
  assert result["resumed"][0]["command"].endswith("--resume --out " + out)
  page = open(os.path.join(out, "peak_memory.md")).read()
  assert "resumed by `python experiments/peak_memory.py --quick" in page
  assert "Partial" not in page


def test_resume_of_a_finished_run_measures_nothing(script, tmp_path,
                                                   monkeypatch):
  out = str(tmp_path)
  _stopped_run(out, with_max_batch=True)
  monkeypatch.setattr(pm, "peak_bytes", _no_compiles)
  monkeypatch.setattr(pm, "max_batches", _no_compiles)
  result = script("peak_memory").main(
      ["--quick", "--no-cnn", "--resume", "--out", out])
  assert len(result["peaks"]) == len(result["max_batch"]) == 1
  assert result["max_batch"][0]["batch"] == {"vanilla": 8, "hosvd": 12}


def test_without_resume_the_old_tables_are_replaced(script, tmp_path,
                                                    monkeypatch):
  out = str(tmp_path)
  _stopped_run(out, with_max_batch=True)
  measured = []
  monkeypatch.setattr(pm, "peak_bytes",
                      lambda s, n, b: measured.append(n) or 7 * MIB)
  monkeypatch.setattr(pm, "max_batches", lambda s, names, budget, **kw: {
      n: lv.measure.MaxBatch(2, 7 * MIB, budget, {2: 7 * MIB})
      for n in names})
  result = script("peak_memory").main(["--quick", "--no-cnn", "--out", out])
  assert measured == ["vanilla", "hosvd"]
  assert "resumed" not in result
  assert result["peaks"][0]["peak_bytes"]["hosvd"] == 7 * MIB
