"""experiments/tdlrt.py runs end to end (two steps) and writes its report."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")


def test_smoke_run_writes_report(tmp_path, script):
  exp = script("tdlrt")
  # One τ, channel modes only and no adapter runs: every code path of the
  # compression comparison in a few compiles (adapters: tests/test_tdlrt.py).
  report = exp.main(["--workdir", str(tmp_path), "--steps", "2",
                     "--taus", "0.3", "--hosvd-tau", "0.3",
                     "--adaptive-modes", "channels", "--no-adapters"])
  with open(tmp_path / "report.json") as f:
    on_disk = json.load(f)
  assert on_disk["methods"].keys() == report["methods"].keys()
  names = set(report["methods"])
  assert {"full", "full+hosvd", "tdlrt_tau=0.3", "tucker_tau=0.3",
          "matrix_tau=0.3", "tdlrt_tau=0.3+hosvd"} <= names
  for entry in on_disk["methods"].values():
    assert 0.0 <= entry["accuracy"] <= 1.0
    c = entry["compression"]
    assert 0.0 < c["params_kept_frac"] <= 1.0
    assert abs(c["compression_rate"] - (1 - c["params_kept_frac"])) < 1e-9
    assert set(entry["memory_bytes"]) == {
        "params", "optimizer_state", "activations_conv2_conv3"}
  m = on_disk["methods"]
  # Same ranks, same parameters; TDLRT keeps optimizer state for cores only.
  assert (m["tdlrt_tau=0.3"]["compression"]["params_kept"]
          == m["tucker_tau=0.3"]["compression"]["params_kept"])
  assert (m["tdlrt_tau=0.3"]["memory_bytes"]["optimizer_state"]
          < m["tucker_tau=0.3"]["memory_bytes"]["optimizer_state"])
  # HOSVD residuals are smaller than the saved activations.
  assert (m["full+hosvd"]["memory_bytes"]["activations_conv2_conv3"]
          < m["full"]["memory_bytes"]["activations_conv2_conv3"])
  assert (tmp_path / "metrics.jsonl").stat().st_size > 0
  if report["plot"] is not None:
    assert (tmp_path / "tdlrt.png").stat().st_size > 0
