"""The core package imports no training dependency; lowrank_vjp.training
imports them on first use only."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("orbax", "orbax.checkpoint", "tensorflow_datasets", "matplotlib")


def _loaded_after(statement: str) -> list[str]:
  code = (f"import sys; {statement}; "
          f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], check=True,
                       capture_output=True, text=True).stdout.strip()
  return [m for m in out.split(",") if m]


def test_the_core_package_imports_no_training_dependency():
  assert _loaded_after(
      "import lowrank_vjp, lowrank_vjp.flax, lowrank_vjp.rules, "
      "lowrank_vjp.models, lowrank_vjp.measure") == []


@pytest.mark.parametrize("module", ["lowrank_vjp.training",
                                    "lowrank_vjp.training.data",
                                    "lowrank_vjp.training.checkpoint",
                                    "lowrank_vjp.training.plots"])
def test_the_training_package_imports_them_lazily(module):
  assert _loaded_after(f"import {module}") == []
