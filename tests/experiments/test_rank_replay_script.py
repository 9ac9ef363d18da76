"""experiments/rank_replay.py: the replay of a run's own settings is what
the run's report says."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("sklearn")

TINY = ["--dataset", "sklearn_digits", "--batch-size", "4", "--image-size",
        "32", "--eval-examples", "8", "--eval-batch-size", "8",
        "--no-progress"]


def test_replay_of_the_runs_own_settings_matches_its_report(
    script, tmp_path, data_dir, capsys):
  workdir = str(tmp_path / "run")
  script("train").main(TINY + [
      "--data-dir", data_dir, "--workdir", workdir, "--steps", "5",
      "--method", "hosvd", "--eps", "0.9", "--rank-patience", "2",
      # Waiting for every compile makes the run's own settings replayable
      # to the digit (background compiles finish when they finish).
      "--no-rank-background-compile"])
  run_dir = workdir                  # a one-method job writes it there
  out = str(tmp_path / "replay.json")
  rows = script("rank_replay").main([run_dir, "--grid", "2,2,1;4,2,1",
                                     "--out", out])
  with open(os.path.join(run_dir, "report.json")) as f:
    rc = json.load(f)["rank_control"]
  own = rows[0]
  assert own["patience"] == 2 and own["probe"]
  assert own["residual_over_optimal"] == pytest.approx(
      rc["residual_over_optimal"], rel=1e-9)
  assert own["compiles"] == rc["compiles"]
  assert len(rows) == 5            # the run's own, then 2 settings x 2
  assert "| the run's own |" in capsys.readouterr().out
  with open(out) as f:
    assert len(json.load(f)["rows"]) == 5
