"""Tests for lowrank_vjp._src.schedule: tie and after change no value."""

from __future__ import annotations

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
