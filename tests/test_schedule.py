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



def test_divided_once_differentiates_as_the_division():
  """Its bit casts carry no tangent; the rule must (a second derivative
  through the custom VJP's ``computed_once(g)`` came out zero without)."""
  x = jnp.asarray([1.5, -2.0, 0.25])
  d = jnp.asarray(4.0)
  f = lambda x, d: jnp.sum(jnp.sin(schedule.divided_once(x, d)) ** 2)
  ref = lambda x, d: jnp.sum(jnp.sin(x / d) ** 2)
  for got, want in ((jax.grad(f, (0, 1))(x, d), jax.grad(ref, (0, 1))(x, d)),
                    (jax.hessian(f)(x, d), jax.hessian(ref)(x, d))):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  once = lambda x: jnp.sum(jnp.tanh(schedule.computed_once(x)) ** 2)
  np.testing.assert_allclose(
      jax.hessian(once)(x), jax.hessian(lambda x: jnp.sum(jnp.tanh(x) ** 2))(x),
      rtol=1e-6, atol=1e-7)


def test_divided_once_of_a_quotient_is_not_reassociated():
  """XLA rewrote ``(a / b) / c`` into ``a / (b·c)``: the outer quotient then
  read ``a`` again, which stayed alive beside ``a / b`` (a ReLU6's input
  beside its output, under HOSVD's scaling)."""
  x = jnp.ones((4, 8))
  hlo = jax.jit(lambda x, s: schedule.divided_once(
      schedule.computed_once(jnp.clip(x, 0, 6)), s)).lower(
          x, jnp.float32(3.0)).compile().as_text()
  assert len(re.findall(r"f32\[4,8\]\{[^}]*\} divide\(", hlo)) == 2, hlo
  assert not re.search(r"f32\[4,8\]\{[^}]*\} multiply\(", hlo), hlo
