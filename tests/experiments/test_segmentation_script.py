"""experiments/segmentation.py: a two-step run on tiny canvases."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("sklearn")
pytest.importorskip("importlib_resources")


def test_segmentation_smoke(tmp_path, data_dir, script):
  segmentation = script("segmentation")
  (report,) = segmentation.main([
      "--data-dir", data_dir, "--workdir", str(tmp_path), "--steps", "2",
      "--batch-size", "2", "--image-size", "32", "--train-examples", "8",
      "--test-examples", "4", "--method", "hosvd", "--layers", "4",
      "--no-progress"])
  assert 0.0 <= report["mean_iou"] <= 1.0
  assert report["layers"][-1] == "encoder/features/18/0"
  assert report["activation_memory_analytic_peak_mib"] > 0
  assert "stand-in" in report["task"]
  # HOSVD ran under the rank controller: every step kept ε, and the first
  # step's probe at the configured capacities made at least two programs.
  assert report["steps_below_eps"] == 0 and report["compiles"] >= 2
  assert report["settings"]["on_overflow"] == "ignore"
  with open(tmp_path / "report.json") as f:
    assert [r["run"] for r in json.load(f)["runs"]] == ["hosvd(eps=0.8)"]
  with open(tmp_path / "hosvd.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2]
  assert os.path.getsize(tmp_path / "hosvd.jsonl") > 0
  page = (tmp_path / "segmentation.md").read_text()
  assert page.startswith("`python experiments/segmentation.py --data-dir")
  assert "| hosvd(eps=0.8) | " in page
