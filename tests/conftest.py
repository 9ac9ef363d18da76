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
import shutil
import tempfile
import uuid

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

# Many tests compile the same programs (train.py's steps under several
# flags, the same model in several files). JAX's persistent cache, in a
# folder of this run's own that ``pytest -n`` workers share and that is
# deleted when the run ends (every run starts cold, as CI does), compiles
# each distinct program once. LOWRANK_VJP_TEST_COMPILE_CACHE=0 turns it off.
_CACHE = os.environ.get("LOWRANK_VJP_TEST_COMPILE_CACHE", "1") != "0"


def _cache_dir(run: str) -> str:
  return os.path.join(tempfile.gettempdir(),
                      f"lowrank_vjp_tests_{os.getuid()}", run)


if _CACHE:
  jax.config.update("jax_compilation_cache_dir", _cache_dir(
      os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_configure(config):
  # Under pytest -n the workers' folder is named by the run's id: fix it
  # here so that the controller can delete the folder at the end.
  if (not hasattr(config, "workerinput")
      and getattr(config.option, "testrunuid", "") is None):
    config.option.testrunuid = uuid.uuid4().hex


def pytest_unconfigure(config):
  if _CACHE and not hasattr(config, "workerinput"):
    for run in (getattr(config.option, "testrunuid", None), os.getpid()):
      if run:
        shutil.rmtree(_cache_dir(str(run)), ignore_errors=True)


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
