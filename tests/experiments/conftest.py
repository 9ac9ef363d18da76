"""Loads the scripts of experiments/ by file path (no ``sys.path`` edits)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                           "experiments")


def load_script(name: str):
  """``experiments/<name>.py`` as a module named ``experiments_<name>``."""
  path = os.path.abspath(os.path.join(EXPERIMENTS, f"{name}.py"))
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="session")
def script():
  """``script(name)``: the loaded module of ``experiments/<name>.py``."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = load_script(name)
    return cache[name]

  return get


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A tfds data directory shared by the scripts' tests."""
  return str(tmp_path_factory.mktemp("tfds"))
