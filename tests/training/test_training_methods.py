"""lowrank_vjp.training.methods: method names to layer settings."""

from __future__ import annotations

import pytest

import lowrank_vjp.flax as lvf
from lowrank_vjp import training
from lowrank_vjp.training import methods

ALL = ("vanilla", "none", "hosvd", "svd", "asi", "quant", "gradfilter",
       "checkpoint")


@pytest.mark.parametrize("name,want", [
    ("vanilla", {"method": "none"}),
    ("none", {"method": "none"}),
    ("hosvd", {"method": "hosvd", "eps": 0.7, "on_overflow": "ignore"}),
    ("svd", {"method": "svd", "eps": 0.7, "on_overflow": "ignore"}),
    ("asi", {"method": "asi"}),
    ("quant", {"method": "quant"}),
    ("gradfilter", {"method": "gradfilter"}),
    ("checkpoint", {"method": "checkpoint"}),
])
def test_eps_goes_only_to_the_methods_that_take_it(name, want):
  assert methods.method_settings(name, eps=0.7) == want


@pytest.mark.parametrize("name,extra", [
    ("quant", {"bits": 4, "per_channel": True}),
    ("gradfilter", {"radius": 4}),
    ("asi", {"rank_fraction": 0.5}),
    ("hosvd", {"rank_fraction": 1.0, "on_overflow": "warn"}),
])
def test_method_kwargs_are_added_and_override(name, extra):
  got = methods.method_settings(name, eps=0.9, method_kwargs=extra)
  assert got["method"] == name
  assert {k: got[k] for k in extra} == extra
  assert ("eps" in got) == (name in ("hosvd", "svd"))
  # JSON text, as the flags pass it, reads the same.
  import json  # pylint: disable=g-import-not-at-top
  assert methods.method_settings(
      name, eps=0.9, method_kwargs=json.dumps(extra)) == got


def test_vanilla_ignores_method_kwargs():
  assert methods.method_settings("vanilla", eps=0.9,
                                 method_kwargs={"bits": 4}) == {
                                     "method": "none"}


@pytest.mark.parametrize("name", ALL)
def test_every_method_builds_a_flax_adapter(name):
  settings = methods.method_settings(name, eps=0.8)
  assert methods.unsupported(settings) is None
  lvf.conv_cls(**settings)


def test_unsupported_says_why():
  why = methods.unsupported({"method": "no-such-method"})
  assert why is not None and why.startswith("not available")


@pytest.mark.parametrize("name,ranks,state,label", [
    ("vanilla", False, False, "vanilla"),
    ("hosvd", True, False, "hosvd(eps=0.8)"),
    ("svd", True, False, "svd(eps=0.8)"),
    ("asi", False, True, "asi"),
    ("quant", False, False, "quant"),
    ("gradfilter", False, False, "gradfilter"),
])
def test_what_a_run_is(name, ranks, state, label):
  settings = methods.method_settings(name, eps=0.8)
  assert methods.uses_ranks(settings) is ranks
  assert methods.carries_state(settings) is state
  assert methods.run_label(name, settings) == label
  assert methods.is_vanilla(name) is (name == "vanilla")


def test_labels_show_user_settings():
  settings = methods.method_settings("quant", method_kwargs={"bits": 4})
  assert methods.run_label("quant", settings) == "quant(bits=4)"
  settings = methods.method_settings("asi", method_kwargs={"eps": 0.5})
  assert methods.run_label("asi", settings) == "asi"  # eps decides nothing


def test_settings_for_reads_the_config():
  config = training.TrainConfig(eps=0.85, method_kwargs='{"ranks": 8}')
  assert training.settings_for("svd", config) == {
      "method": "svd", "eps": 0.85, "on_overflow": "ignore", "ranks": 8}


def test_run_names():
  assert methods.run_names(" vanilla, hosvd ,") == ["vanilla", "hosvd"]
  with pytest.raises(SystemExit, match="empty"):
    methods.run_names(" , ")
