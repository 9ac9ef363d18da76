"""Tests for lowrank_vjp._src.schedule: the pins change no value."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_vjp._src import schedule
from lowrank_vjp._src.tensor import tucker


def _residual():
  rng = np.random.default_rng(0)
  return tucker.TuckerResidual(
      jnp.asarray(rng.standard_normal((2, 3)), jnp.float32),
      tuple(jnp.asarray(rng.standard_normal((n, r)), jnp.float32)
            for n, r in ((4, 2), (5, 3))))


def test_tie_and_after_keep_values_nan_included():
  y = jnp.asarray([1.0, np.nan, -np.inf, 0.0])
  res = _residual()
  np.testing.assert_array_equal(schedule.tie(y, res), y)
  g = jnp.asarray([np.nan, 2.0])
  np.testing.assert_array_equal(schedule.after(y, g), y)
  np.testing.assert_array_equal(jax.jit(schedule.tie)(y, res), y)


def _same_or_flushed(got, want, int_type):
  """Bit-equal, except subnormals, which may become zeros of their sign.

  XLA:CPU flushes subnormals to zero in every arithmetic op (a product by
  a runtime one included), so a division by one may too.
  """
  got, want = np.asarray(got), np.asarray(want)
  tiny = np.finfo(want.dtype).tiny if want.dtype != jnp.bfloat16 else 1.2e-38
  sub = (np.abs(want.astype(np.float32)) < tiny) & (want != 0)
  np.testing.assert_array_equal(got[~sub].view(int_type),
                                want[~sub].view(int_type))
  flushed = got[sub].astype(np.float32)
  assert np.all((flushed == want[sub].astype(np.float32)) | (flushed == 0))
  assert np.all(np.signbit(flushed) == np.signbit(want[sub].astype(np.float32)))


def test_computed_once_keeps_every_value():
  tiny = np.finfo(np.float32).smallest_subnormal
  x = jnp.asarray([1.5, np.nan, -np.inf, np.inf, 0.0, -0.0, tiny, -tiny,
                   np.finfo(np.float32).max, 3e-39, np.finfo(np.float32).tiny],
                  jnp.float32)
  for fn in (schedule.computed_once, jax.jit(schedule.computed_once)):
    _same_or_flushed(fn(x), x, np.int32)
  for dtype in (jnp.bfloat16, jnp.float16):
    y = jnp.asarray([1.0, -0.0, np.nan, np.inf, -3.5, 6e-8], dtype)
    got = jax.jit(schedule.computed_once)(y)
    assert got.dtype == y.dtype
    _same_or_flushed(got, y, np.int16)
  ints = jnp.arange(4)
  assert schedule.computed_once(ints) is ints
  empty = jnp.zeros((0, 3))
  assert schedule.computed_once(empty) is empty


def test_computed_once_is_one_division_xla_cannot_fold():
  """The divisor is not a broadcast, which XLA would have rewritten into a
  (cheap, so duplicated) product by its reciprocal."""
  x = jnp.ones((4, 8))
  hlo = jax.jit(lambda x: schedule.computed_once(x * 2.0)).lower(
      x).compile().as_text()
  assert re.search(r"f32\[4,8\]\{[^}]*\} divide\(", hlo), hlo
