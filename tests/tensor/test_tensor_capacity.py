"""Static rank capacities: ``rank_bound``, ``is_rank_value``, ``per_axis``,
``resolve``."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_vjp._src.tensor import capacity


@pytest.mark.parametrize("shape,axis,expected", [
    ((4, 5), 0, 4), ((4, 5), 1, 4), ((2, 3, 4), 2, 4), ((10, 2, 2), 0, 4),
    ((10, 2, 2), -3, 4), ((3, 3, 16, 32), -1, 32), ((7,), 0, 1),
    ((0, 3), 0, 1), ((0, 3), 1, 1)])
def test_rank_bound(shape, axis, expected):
  """``min(I_axis, Π other sizes)``, and at least 1."""
  assert capacity.rank_bound(shape, axis) == expected


def test_rank_bound_is_the_unfolding_rank():
  x = np.random.default_rng(0).normal(size=(2, 3, 10))
  for axis in range(3):
    m = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    assert capacity.rank_bound(x.shape, axis) == np.linalg.matrix_rank(m)


@pytest.mark.parametrize("r", [1, 5, np.int64(3), 0.5, 1.0, np.float32(0.25),
                               1e-6])
def test_is_rank_value_accepts(r):
  assert capacity.is_rank_value(r)


@pytest.mark.parametrize("r", [0, -1, True, False, 0.0, -0.5, 1.5, None, "a",
                               (1,), float("nan")])
def test_is_rank_value_rejects(r):
  assert not capacity.is_rank_value(r)


def test_per_axis_repeats_a_scalar():
  assert capacity.per_axis(3, 4) == (3, 3, 3, 3)
  assert capacity.per_axis(0.5, 2) == (0.5, 0.5)
  assert capacity.per_axis(None, 3) == (None, None, None)


def test_per_axis_keeps_a_sequence():
  assert capacity.per_axis((1, None, 0.5), 3) == (1, None, 0.5)
  assert capacity.per_axis([2, 3], 2) == (2, 3)
  assert isinstance(capacity.per_axis([2, 3], 2), tuple)


def test_per_axis_wrong_length_says_what_and_where():
  with pytest.raises(ValueError, match=r"2 entries but there are 3 modes"):
    capacity.per_axis((1, 2), 3, "modes")
  with pytest.raises(ValueError, match=r"\(shape \(4, 5, 6\)\)"):
    capacity.per_axis((1, 2), 3, shape=(4, 5, 6))
  with pytest.raises(ValueError, match=r"3 axes"):
    capacity.per_axis([1, 2, 3, 4], 3)


@pytest.mark.parametrize("r,size,bound,expected", [
    (3, 7, None, 3), (100, 7, None, 7), (np.int64(3), 7, None, 3),
    (3, 7, 2, 2), (1.0, 7, None, 7), (0.5, 7, None, 4), (0.01, 10, None, 1),
    (0.5, 16, 4, 4), (1, 0, None, 1), (0.5, 0, None, 1)])
def test_resolve(r, size, bound, expected):
  """An int as is, a fraction ``ceil(r · size)``, capped, at least 1."""
  assert capacity.resolve(r, size, bound) == expected
  assert isinstance(capacity.resolve(r, size, bound), int)
