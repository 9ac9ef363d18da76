"""experiments/bench_speed.py: the layers section on tiny inputs."""

from __future__ import annotations

import json


def test_layers_section_times_every_case(tmp_path, script):
  bench = script("bench_speed")
  path = tmp_path / "speed.json"
  result = bench.main(["--only", "layers", "--batch", "2", "--size", "3",
                       "--repeats", "1", "--json", str(path)])
  rows = result["sections"]["layers"]["rows"]
  assert [(r["method"], r["eps"]) for r in rows] == bench.CASES
  assert rows[0]["step_ratio"] == 1.0
  assert all(r["step_s"] > 0 for r in rows)
  with open(path) as f:
    assert json.load(f)["sections"].keys() == {"layers"}
