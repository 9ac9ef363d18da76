"""Shared fixtures: float64 mode and the largest-relative-error log.

Set ``LOWRANK_VJP_REPORT_DIR`` to a folder to get
``<dir>/max_rel_errors.json``: per check (e.g. ``conv_grid_float32``) the
largest relative error seen, the case that produced it and how many cases ran.
Workers of ``pytest -n`` merge into the same file under a lock. Tests assert
their tolerances whether or not the log is written.
"""

from __future__ import annotations

import fcntl
import json
import os

# OpenBLAS's spinning worker threads slow small LAPACK calls (eigh, qr) by two
# orders of magnitude when the cores are shared (seen: 9 ms -> 2.7 s).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# The suite compiles many hundreds of small programs, and LLVM's optimisation
# of the generated CPU code is most of each compile but none of what the
# tests check: XLA's HLO passes (fusion, scheduling, buffer assignment, so
# every memory figure) are the same at any backend level (tests/measure,
# tests/layers and tests/tensor pass either way). Level 0 cut the suite's
# compile-bound files by about a fifth. Users' programs are not affected.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
  os.environ["XLA_FLAGS"] = (
      _flags + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import numpy as np
import pytest


@pytest.fixture
def x64():
  """Runs the test with ``jax_enable_x64`` on; restored afterwards."""
  with jax.enable_x64(True):
    yield


def rel_err(actual, expected) -> float:
  """``max|actual - expected| / max|expected|`` in float64 (NaN-propagating)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
  return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


class ErrorLog:
  """Keeps, per key, the largest relative error seen and where."""

  def __init__(self):
    self.entries: dict[str, dict] = {}

  def record(self, key: str, err: float, case: str) -> float:
    entry = self.entries.setdefault(
        key, {"max_rel_err": 0.0, "worst_case": None, "cases": 0})
    entry["cases"] += 1
    if not err <= entry["max_rel_err"]:  # also catches NaN
      entry["max_rel_err"] = float(err)
      entry["worst_case"] = case
    return err

  def compare(self, key: str, case: str, actual, expected) -> float:
    """Records and returns :func:`rel_err` of ``actual`` vs ``expected``."""
    return self.record(key, rel_err(actual, expected), case)

  def write(self, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "max_rel_errors.json")
    with open(path + ".lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      merged = {}
      if os.path.exists(path):
        with open(path) as f:
          merged = json.load(f)
      for key, entry in self.entries.items():
        old = merged.get(key)
        if old is None:
          merged[key] = dict(entry)
          continue
        old["cases"] += entry["cases"]
        if not entry["max_rel_err"] <= old["max_rel_err"]:
          old["max_rel_err"] = entry["max_rel_err"]
          old["worst_case"] = entry["worst_case"]
      with open(path, "w") as f:
        json.dump(merged, f, indent=2, sort_keys=True)
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def error_log():
  """Session-wide :class:`ErrorLog`, written at the end if asked for."""
  log = ErrorLog()
  yield log
  folder = os.environ.get("LOWRANK_VJP_REPORT_DIR")
  if folder and log.entries:
    log.write(folder)
