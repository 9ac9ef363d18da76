"""The public API: every exported symbol is documented on docs/index.md."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

NAMESPACES = ("lowrank_vjp", "lowrank_vjp.methods", "lowrank_vjp.flax",
              "lowrank_vjp.rules", "lowrank_vjp.measure",
              "lowrank_vjp.models", "lowrank_vjp.models.nnx",
              "lowrank_vjp.nnx", "lowrank_vjp.tdlrt",
              "lowrank_vjp.training")
PAGE = pathlib.Path(__file__).parents[1] / "docs" / "index.md"


@pytest.mark.parametrize("name", NAMESPACES)
def test_every_public_symbol_is_on_the_api_page(name):
  module = importlib.import_module(name)
  documented = set(re.findall(r"`([A-Za-z_]\w*)", PAGE.read_text()))
  subpackages = {n for n in module.__all__
                 if f"{name}.{n}" in NAMESPACES}
  missing = sorted(set(module.__all__) - documented - subpackages)
  assert not missing, f"{name}: {missing} are not on docs/index.md"
  for symbol in module.__all__:
    assert getattr(module, symbol) is not None


def test_the_api_page_names_no_symbol_that_is_gone():
  gone = ("CompressionConfig", "asi_conv", "AsiConv",
          "AsiConvGeneralDilated")
  text = PAGE.read_text()
  assert not [g for g in gone if f"`{g}" in text]
