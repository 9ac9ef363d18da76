"""Static rank capacities of the Tucker methods (HOSVD, SVD, ASI).

Mirrors ``lowrank_vjp/_src/methods/tucker.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import lowrank_vjp as lv

M = lv.methods


def test_capacity_defaults_hosvd():
  shape = (8, 6, 5, 3)
  m = M.Hosvd(eps=0.9, rank_fraction=0.5)
  assert m.capacity(shape) == tuple(math.ceil(0.5 * n) for n in shape)
  m = M.Hosvd(eps=0.9, rank_fraction=0.3)
  assert m.capacity(shape) == (3, 2, 2, 1)


def test_capacity_full_at_eps1():
  shape = (8, 6, 5, 3)
  assert M.Hosvd(eps=1.0, rank_fraction=0.1).capacity(shape) == shape


def test_capacity_svd_compresses_only_the_batch_axis():
  m = M.Svd(eps=0.9, rank_fraction=0.5)
  assert m.capacity((8, 6, 5, 3)) == (4, None, None, None)
  assert m.capacity((6, 5, 8), batch_axis=2) == (None, None, 4)
  m = M.Svd(ranks=(3, None, None, None))
  assert m.capacity((8, 6, 5, 3)) == (3, None, None, None)
  # Entries on axes the SVD does not compress used to be ignored silently.
  with pytest.raises(ValueError, match=r"ranks\[1\].*does not compress"):
    M.Svd(ranks=(3, 1, 1, 1)).capacity((8, 6, 5, 3))


def test_capacity_asi_defaults_to_a_quarter():
  assert M.Asi().capacity((8, 8, 4, 16)) == (2, 2, 1, 4)


@pytest.mark.parametrize("shape,bound", [
    ((2, 3, 50), (2, 3, 6)),       # an axis above the product of the others
    ((100, 2, 3), (6, 2, 3)),
    ((1, 8, 8), (1, 8, 8)),
    ((4, 1, 1, 16), (4, 1, 1, 4)),
])
def test_capacity_never_exceeds_unfolding_rank(shape, bound):
  assert M.Hosvd(eps=1.0).capacity(shape) == bound
  assert M.Hosvd(ranks=1000).capacity(shape) == bound   # an int: "at most"
  capacity = M.Hosvd(eps=0.5).capacity(shape)
  for cap, n in zip(capacity, shape, strict=True):
    assert 1 <= cap <= min(n, math.prod(shape) // n)


def test_capacity_int_ranks_apply_to_every_axis():
  assert M.Hosvd(ranks=3).capacity((8, 6, 5, 2)) == (3, 3, 3, 2)


def test_capacity_tuple_ranks_with_none_leave_axes_uncompressed():
  m = M.Hosvd(ranks=(4, None, 2, None))
  assert m.capacity((8, 6, 5, 3)) == (4, None, 2, None)


@pytest.mark.parametrize("ranks", [(2, 2), (2, 2, 2, 2, 2)])
def test_capacity_ranks_length_mismatch_raises(ranks):
  with pytest.raises(ValueError, match="ranks"):
    M.Hosvd(ranks=ranks).capacity((8, 6, 5, 3))


@pytest.mark.parametrize("method", [M.Hosvd, M.Svd, M.Asi])
def test_an_explicit_rank_above_its_axis_is_refused(method):
  with pytest.raises(ValueError, match=r"ranks\[0\] = 7 .*axis 0.*size is 2"):
    method(ranks=(7, None, None, None)).capacity((2, 8, 8, 4))


def test_an_explicit_rank_within_the_axis_is_capped_at_the_unfolding_rank():
  # Axis 2 has 50 entries but its unfolding has rank <= 2 * 3.
  assert M.Hosvd(ranks=(None, None, 40)).capacity((2, 3, 50)) == (
      None, None, 6)


def test_capacity_is_static_python_ints():
  cap = M.Hosvd(ranks=np.int64(2)).capacity(np.array([4, 5]))
  assert cap == (2, 2)
  assert all(type(c) is int for c in cap)


def test_with_capacity_sets_ranks_except_for_asi():
  assert M.Hosvd().with_capacity((2, None, 3)) == M.Hosvd(ranks=(2, None, 3))
  assert M.Svd().with_capacity((2, None)) == M.Svd(ranks=(2, None))
  assert M.Asi().with_capacity((2, 2)) == M.Asi()   # fixed ranks
  assert M.Quant().with_capacity((2, 2)) == M.Quant()


# -------------------------------------------------- float16 residuals ---


@pytest.mark.parametrize("method", [M.Hosvd(eps=0.9), M.Hosvd(eps=1.0),
                                    M.Svd(eps=1.0)], ids=str)
def test_float16_core_cannot_overflow(method):
  """‖x‖_F = 96000 > 65504: a float16 core overflowed to inf (issue item 1)."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  dn = ("NHWC", "HWIO", "NHWC")
  x = jnp.full((4, 8, 8, 4), 3000., jnp.float16)
  w = jnp.full((3, 3, 4, 4), .01, jnp.float16)

  def loss(conv):
    return lambda w: 0.01 * jnp.sum(conv(x, w, (1, 1), "SAME",
                                         dimension_numbers=dn
                                         ).astype(jnp.float32))

  want = jax.grad(loss(lax.conv_general_dilated))(w).astype(jnp.float32)
  assert bool(jnp.all(jnp.isfinite(want)))
  conv = lv.compressed_conv(method=method)
  got = jax.grad(loss(conv))(w).astype(jnp.float32)
  assert bool(jnp.all(jnp.isfinite(got)))
  np.testing.assert_allclose(got, want, rtol=2e-3)
  _, stats = conv.with_stats(x, w, (1, 1), "SAME", dimension_numbers=dn)
  assert not bool(stats.overflow)
  np.testing.assert_allclose(stats.kept_energy, 1.0, atol=1e-3)


def test_core_dtype():
  import jax.numpy as jnp
  from lowrank_vjp._src.tensor import tucker
  assert tucker.core_dtype(jnp.float16) == jnp.float32
  assert tucker.core_dtype(jnp.bfloat16) == jnp.bfloat16
  assert tucker.core_dtype(jnp.float32) == jnp.float32
