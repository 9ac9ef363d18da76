"""experiments/train.py --api nnx: the Linen job's numbers through NNX, and
exact resumption (ASI state and rank controller included)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("sklearn")
pytest.importorskip("importlib_resources")

TINY = ["--dataset", "sklearn_digits", "--batch-size", "4", "--image-size",
        "32", "--eval-examples", "8", "--eval-batch-size", "8",
        "--no-progress"]


@pytest.fixture(scope="module")
def train(script):
  return script("train")


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _report(workdir):
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


def test_nnx_job_trains_as_the_linen_job(train, tmp_path, data_dir):
  # No dropout: the two APIs draw their dropout masks from different keys.
  common = TINY + ["--data-dir", data_dir, "--steps", "3", "--method",
                   "hosvd", "--eps", "0.9", "--model-kwargs",
                   '{"dropout_rate": 0.0}']
  runs = {}
  for api in ("linen", "nnx"):
    workdir = str(tmp_path / api)
    train.main(common + ["--api", api, "--workdir", workdir])
    runs[api] = (_rows(workdir), _report(workdir))
  (rows_l, rep_l), (rows_n, rep_n) = runs["linen"], runs["nnx"]
  assert rep_n["api"] == "nnx" and rep_l["api"] == "linen"
  assert [r["step"] for r in rows_n] == [1, 2, 3]
  for a, b in zip(rows_l, rows_n, strict=True):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
    assert a["ranks"] == b["ranks"]
  assert rep_n["layers"] == rep_l["layers"]
  assert (rep_n["activation_memory_analytic_peak_mib"]
          == rep_l["activation_memory_analytic_peak_mib"])
  # The same program up to NNX's bookkeeping (its stats records are inputs).
  assert rep_n["xla_peak_mib"] == pytest.approx(rep_l["xla_peak_mib"],
                                                rel=0.1)
  assert rep_n["accuracy"] == rep_l["accuracy"]


def test_nnx_gpt_trains_as_the_linen_gpt(train, tmp_path, data_dir):
  common = ["--model", "gpt_small", "--model-kwargs",
            '{"n_layer": 1, "n_embd": 32}', "--method", "quant", "--steps",
            "2", "--batch-size", "2", "--seq-len", "16", "--eval-examples",
            "4", "--eval-batch-size", "4", "--no-progress", "--data-dir",
            data_dir]
  reports = []
  for api in ("linen", "nnx"):
    workdir = str(tmp_path / api)
    train.main(common + ["--api", api, "--workdir", workdir])
    reports.append((_rows(workdir), _report(workdir)))
  (rows_l, rep_l), (rows_n, rep_n) = reports
  for a, b in zip(rows_l, rows_n, strict=True):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
  # The same compressed layers; the same residual bytes, LayerNorms included.
  assert rep_n["layers"] == rep_l["layers"]
  assert (rep_n["activation_memory_analytic_peak_mib"]
          == pytest.approx(rep_l["activation_memory_analytic_peak_mib"]))
  assert rep_n["val_loss"] == pytest.approx(rep_l["val_loss"], rel=1e-4)


def test_nnx_resume_reproduces_the_uninterrupted_run(train, tmp_path,
                                                     data_dir):
  common = TINY + ["--data-dir", data_dir, "--steps", "4", "--method",
                   "asi", "--checkpoint-every", "2", "--api", "nnx"]
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.main(common + ["--workdir", straight])
  assert train.main(common + ["--workdir", resumed, "--interrupt-at",
                              "2"]) == []
  train.main(common + ["--workdir", resumed])
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  states = [ocp.CheckpointManager(os.path.join(w, "ckpt")).restore(4)
            for w in (straight, resumed)]
  leaves = [jax.tree_util.tree_leaves_with_path(s) for s in states]
  assert len(leaves[0]) == len(leaves[1]) > 0
  for (pa, a), (pb, b) in zip(*leaves, strict=True):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  started = [v for p, v in leaves[0] if "started" in jax.tree_util.keystr(p)]
  assert len(started) == 4 and all(bool(v) for v in started)
  for ra, rb in zip(_rows(straight), _rows(resumed), strict=True):
    assert ra["loss"] == rb["loss"]
  assert _report(straight)["accuracy"] == _report(resumed)["accuracy"]
