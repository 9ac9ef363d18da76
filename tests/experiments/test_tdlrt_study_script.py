"""experiments/tdlrt_study.py runs end to end (a few steps, two seeds)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")


def test_smoke_run_writes_report(tmp_path, script):
  exp = script("tdlrt_study")
  report = exp.main(["--workdir", str(tmp_path), "--seeds", "2",
                     "--steps", "3", "--finetune-steps", "1",
                     "--local-steps", "2", "--lrs", "0.01",
                     "--conditions", "cond=10",
                     "--variants", "local_steps=1,second_moments=mean"])
  runs = [json.loads(line)
          for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
  variant = "tdlrt[local_steps=1,second_moments=mean]"
  methods = {"full", "tdlrt", "tucker_oracle", "tucker_uniform", "matrix",
             variant}
  assert set(report["summary"]) == methods
  assert len(runs) == 2 * len(methods) + 2 * 2
  by = {(r["method"], r["seed"]): r for r in runs}
  for s in range(2):
    # The oracle has TDLRT's ranks, the others about its parameter count.
    assert by["tucker_oracle", s]["ranks"] == by["tdlrt", s]["ranks"]
    kept = by["tdlrt", s]["params_kept"]
    for m in ("tucker_uniform", "matrix"):
      assert abs(by[m, s]["params_kept"] - kept) < 0.05 * kept
    assert by["tucker_capacity@cond=10", s]["ranks"] == {
        "conv2": [3, 3, 16, 32], "conv3": [3, 3, 32, 32]}
  for e in report["summary"].values():
    assert e["seeds"] == [0, 1] and e["lr"] == 0.01
  assert report["summary"]["full"]["minus_reference"]["n"] == 2
  assert report["robustness"]["cond=10"]["tdlrt_minus_tucker"]["n"] == 2
  page = (tmp_path / "tdlrt_study.md").read_text()
  assert page.count("| tucker_oracle |") == 1 and "| cond=10 |" in page
  assert report["summary"][variant]["minus_reference"]["n"] == 2
  on_disk = json.loads((tmp_path / "report.json").read_text())
  assert on_disk["command"].startswith("python experiments/tdlrt_study.py")


@pytest.mark.parametrize("argv, match", [
    (["--conditions", "cond"], "neither cond=R"),
    (["--conditions", "scale=-1"], "neither cond=R"),
    (["--baselines", "full,lora"], "lora"),
    (["--variants", "beta=2"], "key=value"),
    (["--variants", "second_moments=reference"], "second_moments"),
    (["--variants", "local_steps=0"], "local_steps"),
])
def test_bad_arguments_fail_before_training(tmp_path, script, argv, match):
  exp = script("tdlrt_study")
  with pytest.raises(ValueError, match=match):
    exp.main(["--workdir", str(tmp_path), *argv])
  assert not (tmp_path / "runs.jsonl").exists()
