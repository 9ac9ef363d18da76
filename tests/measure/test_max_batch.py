"""The largest batch under a budget, against a brute-force search.

Mirrors ``lowrank_vjp/_src/measure/max_batch.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import lowrank_vjp as lv

DN = ("NHWC", "HWIO", "NHWC")


@functools.cache
def _make_step(method, batch):
  conv = lv.compressed_conv(method=method)
  w = jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32)
  x = jax.ShapeDtypeStruct((batch, 12, 12, 8), jnp.float32)

  def loss(w, x):
    for _ in range(3):
      x = lv.relu(conv(x, w, (1, 1), "SAME", dimension_numbers=DN))
    return jnp.sum(x)

  def step(w, x):
    return w - 0.1 * jax.grad(loss)(w, x)

  return jax.jit(step, donate_argnums=0), (w, x)


def _peak(method, batch):
  return lv.measure.xla_memory(*_flat(_make_step(method, batch))).peak_bytes


def _flat(step_args):
  fn, args = step_args
  return (fn, *args)


@pytest.mark.parametrize("method", ["none", "quant"])
def test_max_batch_equals_brute_force(method):
  peaks = {b: _peak(method, b) for b in range(1, 21)}
  budget = (peaks[13] + peaks[14]) // 2    # between two batch sizes
  brute = max(b for b, p in peaks.items() if p <= budget)
  found = lv.measure.max_batch(
      lambda b: _make_step(method, b), budget, limit=20)
  assert found.batch == brute
  assert found.peak_bytes == peaks[brute] <= budget
  assert found.budget_bytes == budget
  assert all(found.tried[b] == peaks[b] for b in found.tried)
  assert len(found.tried) < 10               # a search, not a scan
  # A budget below the smallest step: nothing fits.
  nothing = lv.measure.max_batch(lambda b: _make_step(method, b),
                                 peaks[1] - 1, limit=20)
  assert (nothing.batch, nothing.peak_bytes) == (0, 0)
  # A budget above everything: the limit.
  assert lv.measure.max_batch(lambda b: _make_step(method, b),
                              10 * peaks[20], limit=20).batch == 20


def test_compression_fits_a_larger_batch():
  budget = _peak("none", 16)
  vanilla = lv.measure.max_batch(lambda b: _make_step("none", b), budget,
                                 limit=64)
  quant = lv.measure.max_batch(lambda b: _make_step("quant", b), budget,
                               limit=64)
  assert vanilla.batch >= 16
  assert quant.batch > vanilla.batch


def test_a_tolerance_stops_the_bisection_early_on_a_fitting_batch():
  budget = (_peak("none", 29) + _peak("none", 30)) // 2
  exact = lv.measure.max_batch(lambda b: _make_step("none", b), budget,
                               limit=40)
  rough = lv.measure.max_batch(lambda b: _make_step("none", b), budget,
                               limit=40, tolerance=0.25)
  assert exact.batch == 29
  assert rough.peak_bytes == rough.tried[rough.batch] <= budget  # it fits
  assert 29 / 1.25 <= rough.batch <= 29
  assert len(rough.tried) < len(exact.tried)


@pytest.mark.parametrize("kwargs", [dict(budget_bytes=0),
                                    dict(budget_bytes=10, tolerance=1.0),
                                    dict(budget_bytes=10, tolerance=-0.1),
                                    dict(budget_bytes=10, start=0),
                                    dict(budget_bytes=10, start=5, limit=4),
                                    dict(budget_bytes=1.5)])
def test_bad_arguments_are_refused(kwargs):
  with pytest.raises(ValueError, match="max_batch"):
    lv.measure.max_batch(lambda b: _make_step("none", b), **kwargs)
