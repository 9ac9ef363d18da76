"""The core package imports no training dependency; lowrank_vjp.training
imports them on first use only."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("orbax", "orbax.checkpoint", "tensorflow_datasets", "matplotlib")
CORE = ("import lowrank_vjp, lowrank_vjp.flax, lowrank_vjp.rules, "
        "lowrank_vjp.models, lowrank_vjp.measure")
TRAINING = ["lowrank_vjp.training", "lowrank_vjp.training.data",
            "lowrank_vjp.training.checkpoint", "lowrank_vjp.training.plots"]


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
  """Heavy modules in ``sys.modules`` after each import, in one fresh
  interpreter (one start-up of JAX, not five): the core package first, then
  each training module in turn. What an import loads in a fresh interpreter
  is a subset of what it loads after the earlier ones, so none loaded here
  means none loaded by that import alone."""
  steps = [("core", CORE)] + [(m, f"import {m}") for m in TRAINING]
  code = "import json, sys\nout = {}\n"
  for key, statement in steps:
    code += (f"{statement}\nout[{key!r}] = "
             f"[m for m in {HEAVY!r} if m in sys.modules]\n")
  code += "print(json.dumps(out))\n"
  out = subprocess.run([sys.executable, "-c", code], check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_the_core_package_imports_no_training_dependency(loaded):
  assert loaded["core"] == []


@pytest.mark.parametrize("module", TRAINING)
def test_the_training_package_imports_them_lazily(loaded, module):
  assert loaded[module] == []
