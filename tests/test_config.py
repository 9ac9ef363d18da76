"""Tests for lowrank_vjp._src.config: CompressionConfig validation, capacity."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import lowrank_vjp as lv
from lowrank_vjp._src.methods.base import CompressionConfig


def test_defaults_are_valid_and_hashable():
  cfg = CompressionConfig()
  assert (cfg.method, cfg.eps, cfg.ranks, cfg.rank_fraction,
          cfg.on_overflow) == ("hosvd", 0.9, None, 0.5, "warn")
  assert lv.CompressionConfig is CompressionConfig
  assert hash(cfg) == hash(CompressionConfig())
  assert cfg == CompressionConfig()
  assert {cfg: 1}[CompressionConfig()] == 1
  assert cfg != CompressionConfig(eps=0.8)


def test_frozen():
  cfg = CompressionConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.eps = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("eps", [1, 1.0, 0.5, 1e-6, np.float32(0.25),
                                 np.float64(1.0)])
def test_valid_eps_is_stored_as_float(eps):
  cfg = CompressionConfig(eps=eps)
  assert type(cfg.eps) is float
  assert cfg.eps == float(eps)


@pytest.mark.parametrize("eps", [0, 0.0, -0.1, 1.0000001, 2, float("nan"),
                                 float("inf"), -float("inf"), True, False,
                                 "0.5", None, np.array([0.5]), 1j])
def test_invalid_eps_raises_naming_eps(eps):
  with pytest.raises(ValueError, match="eps"):
    CompressionConfig(eps=eps)


@pytest.mark.parametrize("method", ["tucker", "HOSVD", "", None, 1])
def test_unknown_method_raises_naming_method(method):
  with pytest.raises(ValueError, match="method"):
    CompressionConfig(method=method)


@pytest.mark.parametrize("method", ["none", "hosvd", "svd"])
def test_known_methods(method):
  assert CompressionConfig(method=method).method == method


@pytest.mark.parametrize("on_overflow", ["raise", "WARN", None, ""])
def test_invalid_on_overflow_raises(on_overflow):
  with pytest.raises(ValueError, match="on_overflow"):
    CompressionConfig(on_overflow=on_overflow)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan"), True,
                                      "0.5", None])
def test_invalid_rank_fraction_raises(fraction):
  with pytest.raises(ValueError, match="rank_fraction"):
    CompressionConfig(rank_fraction=fraction)


@pytest.mark.parametrize("ranks", [0, -1, 1.5, True, "3", (2, 0), (2, "a"),
                                   (2, True), (2, -3), (2.0, 3),
                                   np.array([2, 3])])
def test_invalid_ranks_raise_naming_ranks(ranks):
  with pytest.raises(ValueError, match="ranks"):
    CompressionConfig(ranks=ranks)


@pytest.mark.parametrize("ranks,stored", [
    (None, None), (3, 3), (np.int64(3), 3), ([2, None, 4], (2, None, 4)),
    ((1, 2), (1, 2))])
def test_valid_ranks(ranks, stored):
  cfg = CompressionConfig(ranks=ranks)
  assert cfg.ranks == stored
  hash(cfg)  # lists are turned into tuples, so it stays hashable


# ----------------------------------------------------------- capacity ---


def test_capacity_defaults_hosvd():
  shape = (8, 6, 5, 3)
  cfg = CompressionConfig(method="hosvd", eps=0.9, rank_fraction=0.5)
  assert cfg.capacity(shape) == tuple(math.ceil(0.5 * n) for n in shape)
  cfg = CompressionConfig(method="hosvd", eps=0.9, rank_fraction=0.3)
  assert cfg.capacity(shape) == (3, 2, 2, 1)


def test_capacity_full_at_eps1():
  shape = (8, 6, 5, 3)
  assert CompressionConfig(eps=1.0, rank_fraction=0.1).capacity(
      shape) == shape


def test_capacity_svd_compresses_only_the_batch_axis():
  cfg = CompressionConfig(method="svd", eps=0.9, rank_fraction=0.5)
  assert cfg.capacity((8, 6, 5, 3)) == (4, None, None, None)
  assert cfg.capacity((6, 5, 8), batch_axis=2) == (None, None, 4)
  cfg = CompressionConfig(method="svd", ranks=(3, 1, 1, 1))
  assert cfg.capacity((8, 6, 5, 3)) == (3, None, None, None)


def test_capacity_none_method():
  assert CompressionConfig(method="none").capacity((4, 5, 6)) == (None,) * 3


@pytest.mark.parametrize("shape,bound", [
    ((2, 3, 50), (2, 3, 6)),       # an axis above the product of the others
    ((100, 2, 3), (6, 2, 3)),
    ((1, 8, 8), (1, 8, 8)),
    ((4, 1, 1, 16), (4, 1, 1, 4)),
])
def test_capacity_never_exceeds_unfolding_rank(shape, bound):
  assert CompressionConfig(eps=1.0).capacity(shape) == bound
  assert CompressionConfig(ranks=1000).capacity(shape) == bound
  capacity = CompressionConfig(eps=0.5).capacity(shape)
  for cap, n in zip(capacity, shape, strict=True):
    assert 1 <= cap <= min(n, math.prod(shape) // n)


def test_capacity_int_ranks_apply_to_every_axis():
  assert CompressionConfig(ranks=3).capacity((8, 6, 5, 2)) == (3, 3, 3, 2)


def test_capacity_tuple_ranks_with_none_leave_axes_uncompressed():
  cfg = CompressionConfig(ranks=(4, None, 2, None))
  assert cfg.capacity((8, 6, 5, 3)) == (4, None, 2, None)


@pytest.mark.parametrize("ranks", [(2, 2), (2, 2, 2, 2, 2)])
def test_capacity_ranks_length_mismatch_raises(ranks):
  cfg = CompressionConfig(ranks=ranks)
  with pytest.raises(ValueError, match="ranks"):
    cfg.capacity((8, 6, 5, 3))


def test_capacity_is_static_python_ints():
  cap = CompressionConfig(ranks=np.int64(2)).capacity(np.array([4, 5]))
  assert cap == (2, 2)
  assert all(type(c) is int for c in cap)
