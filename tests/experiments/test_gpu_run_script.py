"""experiments/gpu_run.py --smoke: every section, its fresh processes too.

On the CPU this checks the machinery (sections, rows, fresh-process peaks,
the JSON) and that the allocator peak, which the CPU does not have, is
reported as unavailable rather than made up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir,
                                    os.pardir))


@pytest.fixture(scope="module")
def smoke(script, tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu")
  result = script("gpu_run").main(["--smoke", "--out", str(out)])
  (path,) = [p for p in os.listdir(out) if p.endswith(".json")]
  with open(os.path.join(out, path)) as f:
    written = json.load(f)
  return result, written, path


def test_writes_the_device_and_versions(smoke):
  result, written, path = smoke
  assert written == json.loads(json.dumps(result))
  env = written["environment"]
  device = jax.devices()[0]
  assert env["device_kind"] == device.device_kind
  assert env["platform"] == device.platform
  assert env["jax"] == jax.__version__ and env["jaxlib"]
  assert "jaxlib" in env["environment_info"]
  assert path.startswith(f"{device.device_kind.lower()}_{env['date']}")
  assert path.endswith("_smoke.json")
  assert not written["skipped"] and not written["failed"]
  assert not written["partial"]
  assert written["command"].startswith("experiments/gpu_run.sh --smoke")


def test_every_method_has_positive_times_and_peaks(smoke):
  _, written, _ = smoke
  methods = written["methods"]
  assert methods == ["vanilla", "hosvd-0.9"]
  sections = written["sections"]
  assert set(sections) == {"step", "layers", "peak"}
  for name in ("step", "peak"):
    rows = sections[name]["rows"]
    assert [r["method"] for r in rows] == methods
    for r in rows:
      assert "error" not in r, r["error"]
      assert r["compile_s"] > 0 and all(t > 0 for t in r["warmup_s"])
      xla = r["xla"]
      assert xla["peak_bytes"] == (xla["argument_bytes"] + xla["output_bytes"]
                                   + xla["temp_bytes"] - xla["alias_bytes"])
      assert xla["peak_bytes"] > 0
  step = sections["step"]
  for r in step["rows"]:
    assert len(r["step_times_s"]) == step["rounds"] * step["round_steps"] > 0
    assert r["step_s"] > 0 and r["step_ratio"] > 0
  assert step["rows"][0]["step_ratio"] == 1.0
  layers = sections["layers"]["rows"]
  assert [r["name"] for r in layers] == methods
  for r in layers:
    assert r["forward_s"] > 0 and r["step_s"] > 0
    assert r["backward_s"] == pytest.approx(r["step_s"] - r["forward_s"])
  peak = {r["method"]: r for r in sections["peak"]["rows"]}
  found = peak["vanilla"]["max_batch"]      # smoke: vanilla's search only
  assert "max_batch" not in peak["hosvd-0.9"]
  assert found["batch"] >= sections["peak"]["batch"]
  assert 0 < found["peak_bytes"] <= found["budget_bytes"]
  assert found["tried"][str(found["batch"])] == found["peak_bytes"]


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="CPU only")
def test_cpu_allocator_peak_is_unavailable_not_made_up(smoke):
  _, written, _ = smoke
  assert jax.devices()[0].memory_stats() is None
  for name in ("step", "peak"):
    for r in written["sections"][name]["rows"]:
      assert r["allocator"] is None and r["allocator_peak_bytes"] is None
      assert r["peak_before_steps_bytes"] is None
      assert r["peak_set_by_steps"] is None
      assert "memory_stats() is None on cpu" in r["allocator_note"]


def test_out_of_budget_skips_every_section_with_a_note(script, tmp_path):
  result = script("gpu_run").main(["--smoke", "--budget-s", "0", "--out",
                                   str(tmp_path)])
  assert result["sections"] == {} and result["partial"]
  assert [s["section"] for s in result["skipped"]] == ["step", "layers",
                                                       "peak"]
  assert all("--budget-s" in s["reason"] for s in result["skipped"])
  # A second run of the day does not overwrite the first one's file.
  script("gpu_run").main(["--smoke", "--budget-s", "0", "--out",
                          str(tmp_path)])
  assert len([p for p in os.listdir(tmp_path) if p.endswith(".json")]) == 2


def test_predicted_start_is_below_the_largest_batch(script):
  predict = script("gpu_run")._predicted_batch
  # Peak 100 + 10·b (intercept 100 ≥ the 60 bytes of arguments): batch 16
  # peaks at 260; under 1000 the largest batch is 90.
  guess = predict(16, 260, 60, 1000)
  assert guess == 75 and 100 + 10 * guess <= 1000
  assert predict(16, 2000, 60, 1000) is None     # batch 16 does not fit


def test_shell_wrapper_sets_the_allocator_and_runs_from_the_root():
  path = os.path.join(ROOT, "experiments", "gpu_run.sh")
  with open(path) as f:
    text = f.read()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "export XLA_PYTHON_CLIENT_PREALLOCATE=false" in text
  assert os.access(path, os.X_OK)
  out = subprocess.run([path, "--help"], capture_output=True, text=True,
                       cwd="/", check=True).stdout
  assert "--budget-s" in out and "--smoke" in out


def test_lease_sequence_reruns_on_the_first_pass_cache(tmp_path):
  """experiments/gpu_lease.sh in smoke mode: the solvers' file, then two
  gpu_run passes, the second loading the first one's programs."""
  path = os.path.join(ROOT, "experiments", "gpu_lease.sh")
  env = dict(os.environ, SMOKE="1", METHODS="vanilla,hosvd-0.9",
             MAX_BATCH_METHODS="", PYTHON=sys.executable)
  run = subprocess.run([path, str(tmp_path)], capture_output=True, text=True,
                       env=env, cwd="/", check=True, timeout=600)
  assert "pass 2: exit 0" in run.stdout, run.stdout[-3000:]
  names = sorted(os.listdir(tmp_path))
  assert [n for n in names if n.startswith("gpu_eigh_")] == [
      f"gpu_eigh_{jax.devices()[0].device_kind.lower()}_"
      f"{names[0].split('_')[1]}_smoke.json"]
  runs = sorted((n for n in names if n.endswith(".json")
                 and not n.startswith("gpu_eigh_")), key=len)  # -2 second
  assert len(runs) == 2
  first, second = (json.load(open(os.path.join(tmp_path, n))) for n in runs)
  assert first["cache_filled_at_start"] is False
  assert second["cache_filled_at_start"] is True
  assert any("filled compilation cache" in n for n in second["notes"])
  assert set(second["sections"]) == {"step", "peak"}
  for a, b in zip(first["sections"]["step"]["rows"],
                  second["sections"]["step"]["rows"], strict=True):
    assert a["method"] == b["method"] and "error" not in b
    # The same program: XLA's estimate of it is the same.
    assert a["xla"] == b["xla"]


def test_peak_section_leaves_out_hosvd_08_unless_asked(script):
  parse = script("gpu_run").parse
  args = parse([])
  assert "hosvd-0.8" in args.names and "hosvd-0.8" not in args.peak_names
  assert args.peak_names[0] == "vanilla"
  assert "hosvd-0.8" not in args.max_batch_names
  args = parse(["--peak-methods", "hosvd-0.8,asi"])
  assert args.peak_names == ["vanilla", "hosvd-0.8", "asi"]
  assert args.max_batch_names == ["vanilla", "asi"]
  with pytest.raises(SystemExit):       # searched in the peak section only
    parse(["--peak-methods", "asi", "--max-batch-methods", "svd-0.9"])
