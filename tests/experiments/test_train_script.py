"""experiments/train.py end to end on tiny data, and exact resumption."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("sklearn")
pytest.importorskip("importlib_resources")

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                      "experiments", "train.py")
TINY = ["--dataset", "sklearn_digits", "--batch-size", "4", "--image-size",
        "32", "--eval-examples", "8", "--eval-batch-size", "8",
        "--no-progress"]


@pytest.fixture(scope="module")
def train(script):
  return script("train")


def test_two_steps_end_to_end(train, tmp_path, data_dir, capsys):
  workdir = str(tmp_path / "run")
  reports = train.main(TINY + ["--data-dir", data_dir, "--workdir", workdir,
                               "--steps", "2", "--method", "vanilla,hosvd",
                               "--checkpoint-every", "1"])
  assert [r["run"] for r in reports] == ["vanilla", "hosvd(eps=0.8)"]
  out = capsys.readouterr().out
  assert "top-1 %" in out and "hosvd(eps=0.8)" in out
  with open(os.path.join(workdir, "report.json")) as f:
    combined = json.load(f)
  assert len(combined["runs"]) == 2
  for name in ("vanilla", "hosvd"):
    with open(os.path.join(workdir, name, "report.json")) as f:
      report = json.load(f)
    for key in ("accuracy", "activation_memory_analytic_peak_mib",
                "activation_memory_analytic_mean_mib", "xla_temp_mib",
                "xla_peak_mib", "step_time_mean_s", "step_time_median_s",
                "ranks"):
      assert report[key] is not None, key
    assert 0.0 <= report["accuracy"] <= 1.0
    assert len(report["layers"]) == 4
    with open(os.path.join(workdir, name, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert set(rows[0]["ranks"]) == set(report["layers"])
  vanilla, hosvd = reports
  # Both measured on the programs that ran: donated, the rank-controlled
  # one at the capacities it ran at; compile time apart from step time.
  for report in reports:
    assert report["xla_alias_mib"] > 0 and report["xla_programs"] >= 1
    assert report["xla_peak_max_mib"] >= report["xla_peak_mib"] > 0
    assert report["compile_time_s"] > 0
  assert hosvd["rank_control"]["compiles"] == hosvd["xla_programs"]
  assert (hosvd["activation_memory_analytic_peak_mib"]
          < vanilla["activation_memory_analytic_peak_mib"])
  assert vanilla["activation_memory_analytic_peak_mib"] == pytest.approx(
      vanilla["activation_memory_vanilla_mib"])
  for png in ("accuracy_vs_memory.png", "ranks.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000


def test_float16_run_scales_its_loss_and_reports_it(train, tmp_path,
                                                     data_dir):
  workdir = str(tmp_path / "half")
  (report,) = train.main(TINY + ["--data-dir", data_dir, "--workdir",
                                 workdir, "--steps", "2", "--method",
                                 "hosvd", "--dtype", "float16"])
  assert report["dtype"] == "float16"
  assert report["skipped_steps"] in (0, 1, 2)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:  # one run
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["loss_scale"] == 2.0 ** 15
  assert report["skipped_steps"] == sum(r["skipped"] for r in rows)
  assert np.isfinite(report["final_loss"]) and 0 <= report["accuracy"] <= 1


def _final_state(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir,
                                                               "ckpt")))
  assert manager.latest_step() == step
  return manager.restore(step)


@pytest.mark.parametrize("method", ["hosvd", "asi"])
def test_resume_reproduces_the_uninterrupted_run(train, tmp_path, data_dir,
                                                 method):
  common = TINY + ["--data-dir", data_dir, "--steps", "4", "--method",
                   method, "--checkpoint-every", "2"]
  straight = str(tmp_path / "straight")
  resumed = str(tmp_path / "resumed")
  train.main(common + ["--workdir", straight])
  assert train.main(common + ["--workdir", resumed, "--interrupt-at",
                              "2"]) == []
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    assert len(f.readlines()) == 2
  train.main(common + ["--workdir", resumed])

  a, b = _final_state(straight, 4), _final_state(resumed, 4)
  leaves_a = jax.tree_util.tree_leaves(a)
  leaves_b = jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  started = jax.tree_util.tree_leaves_with_path(a["asi_state"])
  started = [v for p, v in started if "started" in jax.tree_util.keystr(p)]
  # ASI's factors are checkpointed with the rest; other methods carry none.
  assert len(started) == (4 if method == "asi" else 0)
  assert all(bool(v) for v in started)
  rows = []
  for workdir in (straight, resumed):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows.append([json.loads(line) for line in f])
  assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
  for ra, rb in zip(*rows, strict=True):
    assert ra["loss"] == rb["loss"] and ra["ranks"] == rb["ranks"]
  reports = []
  for workdir in (straight, resumed):
    with open(os.path.join(workdir, "report.json")) as f:
      reports.append(json.load(f))
  assert reports[0]["accuracy"] == reports[1]["accuracy"]


def test_any_tfds_dataset_by_name(train, tmp_path):
  """A tfds dataset by name (mocked: no data is present offline)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=8):
    (report,) = train.main(
        TINY + ["--dataset", "mnist", "--data-dir", str(tmp_path / "tfds"),
                "--workdir", str(tmp_path / "run"), "--steps", "1",
                "--method", "vanilla"])
  assert report["dataset"] == "mnist" and report["num_classes"] == 10
  assert report["steps"] == 1


def test_help_lists_the_flags():
  out = subprocess.run(
      [sys.executable, SCRIPT, "--help"],
      check=True, capture_output=True, text=True).stdout
  for flag in ("--model", "--model-kwargs", "--weights", "--method", "--eps", "--method-kwargs",
               "--layers", "--train-bn", "--dataset", "--data-dir", "--steps",
               "--batch-size", "--image-size", "--optimizer", "--lr",
               "--momentum", "--weight-decay", "--warmup-steps",
               "--clip-grad-norm", "--eval-examples", "--eval-batch-size",
               "--eval-every", "--max-batch-budget-mib", "--seq-len",
               "--checkpoint-every", "--rank-control", "--rank-patience",
               "--rank-headroom", "--workdir", "--seed", "--no-progress",
               "--fresh"):
    assert flag in out, flag


def test_flag_defaults_are_the_library_defaults(train):
  from lowrank_vjp import training  # pylint: disable=g-import-not-at-top
  assert training.TrainConfig.from_flags(vars(train.parse_args([]))) == (
      training.TrainConfig())
  # A model's own defaults where no flag is given, the flag where one is.
  gpt = training.TrainConfig.from_flags(vars(train.parse_args(
      ["--model", "gpt_small"])))
  assert (gpt.optimizer, gpt.layers, gpt.dataset, gpt.weights) == (
      "adam", "all", "python_stdlib_text", "none")
  vit = training.TrainConfig.from_flags(vars(train.parse_args(
      ["--model", "vit_tiny", "--optimizer", "sgd", "--layers", "2"])))
  assert (vit.optimizer, vit.layers, vit.image_size) == ("sgd", "2", 28)


def test_gpt_two_steps_every_run_kind(train, tmp_path, data_dir, capsys):
  """The byte LM through vanilla, per-block checkpoint and codes: held-out
  loss over steps, the largest batch, the neighbours each run kind gets
  (HOSVD on scanned and unscanned GPTs: tests/models/test_models_gpt.py)."""
  workdir = str(tmp_path / "gpt")
  reports = train.main([
      "--model", "gpt_small", "--method", "vanilla,checkpoint,quant",
      "--model-kwargs", '{"n_layer": 2, "n_embd": 32, "n_head": 2}',
      "--steps", "2", "--batch-size", "2", "--seq-len", "16",
      "--eval-examples", "4", "--eval-batch-size", "4", "--eval-every", "1",
      "--max-batch-budget-mib", "0.01", "--data-dir", data_dir,
      "--workdir", workdir, "--no-progress"])
  assert [r["run"] for r in reports] == ["vanilla", "checkpoint", "quant"]
  out = capsys.readouterr().out
  assert "val loss" in out and "python_stdlib_text" in out
  for r in reports:
    assert r["seq_len"] == 16 and r["num_classes"] == 256
    # From scratch, a byte LM's held-out loss starts near ln 256.
    assert 4.0 < r["val_loss"] < 6.5
    # Not even the parameters fit 10 KB: one compile, nothing found (the
    # search itself is tested in test_training_programs.py).
    assert r["max_batch"] == {"budget_mib": 0.01, "batch": 0,
                              "peak_mib": 0.0}
    assert r["xla_alias_mib"] > 0
  vanilla, checkpoint, quant = reports
  # 2 blocks x (c_attn, c_proj, c_fc, c_proj) compressed; the rest trains.
  assert len(quant["layers"]) == 8 and "wte" in quant["trained_layers"]
  assert checkpoint["settings"] == {"method": "none"}
  assert (quant["activation_memory_analytic_peak_mib"]
          < vanilla["activation_memory_analytic_peak_mib"])
  # The same data, seed and initialisation: the first step's loss agrees.
  rows = {}
  for name in ("vanilla", "checkpoint", "quant"):
    with open(os.path.join(workdir, name, "metrics.jsonl")) as f:
      rows[name] = [json.loads(line) for line in f]
    assert "val_loss" in rows[name][0]
  assert rows["vanilla"][0]["loss"] == pytest.approx(
      rows["checkpoint"][0]["loss"], rel=1e-6)
  assert rows["vanilla"][0]["loss"] == pytest.approx(
      rows["quant"][0]["loss"], rel=1e-5)   # the forward pass is exact
  assert os.path.getsize(os.path.join(workdir, "val_loss.png")) > 1000


def test_vit_two_steps(train, tmp_path, data_dir):
  workdir = str(tmp_path / "vit")
  reports = train.main([
      "--model", "vit_tiny", "--dataset", "sklearn_digits", "--image-size",
      "8", "--method", "vanilla,quant", "--steps", "2", "--batch-size", "4",
      "--layers", "2", "--model-kwargs", '{"depth": 3}',
      "--eval-examples", "8", "--eval-batch-size", "8",
      "--data-dir", data_dir, "--workdir", workdir, "--no-progress"])
  vanilla, quant = reports
  assert 0.0 <= quant["accuracy"] <= 1.0
  # The last two of three blocks, their norms, ln_f and the head train.
  assert quant["layers"] == [f"blocks_{i}/{d}" for i in (1, 2) for d in (
      "attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")]
  assert "head" in quant["trained_layers"]
  assert "patch_embed" not in quant["trained_layers"]
  assert vanilla["val_loss"] is not None
