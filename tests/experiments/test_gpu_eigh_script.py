"""experiments/gpu_eigh.py: the solver timings and the choice they make."""

from __future__ import annotations

import jax
import numpy as np
import pytest


def test_smoke_times_every_solver_at_every_size(script, tmp_path):
  result = script("gpu_eigh").main(["--smoke", "--sections", "solvers",
                                    "--out", str(tmp_path)])
  rows = result["sections"]["solvers"]["rows"]
  assert [r["n"] for r in rows] == [7, 40]
  gpu = jax.devices()[0].platform == "gpu"
  for r in rows:
    names = {k for k in r if k != "n"}
    assert {"default", "syevd", "default x4 batched, per Gram"} <= names
    assert ("syevj" in names) == gpu   # Jacobi: a GPU solver only
    assert all(r[k] > 0 for k in names)
  (written,) = list(tmp_path.iterdir())
  assert written.name.endswith("_smoke.json")


def test_subspace_iteration_finds_the_leading_ritz_values(script):
  module = script("gpu_eigh")
  g = module.activation_gram(40, jax.random.PRNGKey(0))
  top = module.subspace_top(g, 10, None, iterations=30)
  exact = np.linalg.eigvalsh(np.asarray(g, np.float64))[::-1][:10]
  assert np.sort(np.asarray(top))[::-1] == pytest.approx(exact, rel=1e-3)


def _layers(step_default, step_jacobi):
  def section(step):
    return {"rows": [{"method": "vanilla", "eps": None, "step_s": 1.0},
                     {"method": "hosvd", "eps": 0.9, "step_s": step}]}
  layers = {"None": section(step_default), "wall_s": 3.0}
  if step_jacobi is not None:
    layers["jacobi"] = section(step_jacobi)
  return {"sections": {"layers": layers}}


def test_choice_is_the_faster_hosvd_step(script):
  choose = script("gpu_eigh").faster_choice
  assert choose(_layers(2.0, 1.0)) == "jacobi"
  assert choose(_layers(1.0, 2.0)) == ""
  assert choose(_layers(1.0, None)) == ""       # off a GPU: one choice
  assert choose({"sections": {}}) == ""
  assert choose({"sections": {"layers": {"jacobi": {"error": "x"}}}}) == ""
