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
  assert result["contend"] == 0 and result["lapack_threads"] == "library"


def test_busy_processes_spin_during_the_block_and_stop_after(script,
                                                             monkeypatch):
  bench = script("bench_speed")
  started = []
  real = bench.subprocess.Popen

  def popen(*args, **kwargs):
    started.append(real(*args, **kwargs))
    return started[-1]

  monkeypatch.setattr(bench.subprocess, "Popen", popen)
  with bench.busy_processes(2):
    assert len(started) == 2
    assert all(p.poll() is None for p in started)  # still spinning
  assert all(p.poll() is not None for p in started)
