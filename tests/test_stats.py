"""Tests for lowrank_vjp._src.stats: what a compressed layer reports."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src.tensor import hosvd, tucker


@pytest.mark.parametrize("method,capacity", [("hosvd", (3, 2, 4)),
                                             ("svd", (3, None, None))])
def test_stats_bytes(method, capacity):
  shape = (6, 5, 4)
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape),
                  jnp.float32)
  res, stats = hosvd.tucker_compress(x, capacity, 0.8, method)
  assert isinstance(stats, lv.CompressionStats)
  assert stats.residual_nbytes == res.nbytes == tucker.tucker_nbytes(
      shape, capacity, 4, 4)
  assert stats.activation_nbytes == 4 * math.prod(shape)
  needed = [int(k) for k in stats.needed_ranks]
  ranks = [k if c is not None else None
           for k, c in zip(needed, capacity, strict=True)]
  assert stats.analytic_nbytes() == tucker.tucker_nbytes(shape, ranks, 4, 4)
  # Static fields survive a trip through jit as pytree metadata.
  out = jax.jit(lambda s: s)(stats)
  assert (out.shape, out.capacity, out.method) == (shape, capacity, method)


@pytest.mark.parametrize("method,want", [
    (lv.methods.GradFilter(), 2 * 4 * 4 * 8 * 4),  # 2x2-pooled 8x8 activation
    (lv.methods.Quant(bits=4), 2 * 8 * 8 * 8 // 2),  # two 4-bit codes a byte
    (lv.methods.Vanilla(), 2 * 8 * 8 * 8 * 4),
], ids=["gradfilter-8", "quant-4", "none-8"])
def test_analytic_nbytes_of_methods_without_ranks(method, want):
  """Shape-only methods count what they save, not the full activation."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
  w = jax.random.normal(jax.random.key(1), (3, 3, 8, 4))
  conv = lv.compressed_conv(method=method)
  _, stats = conv.with_stats(x, w, (1, 1), "SAME",
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert stats.analytic_nbytes() == stats.residual_nbytes
  assert stats.residual_nbytes >= want
  assert stats.residual_nbytes <= want + 64   # per-tensor scale and offset


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_uncompressed_stats(dtype):
  stats = stats_lib.uncompressed((2, 3, 4), dtype, "none")
  itemsize = jnp.dtype(dtype).itemsize
  assert stats.residual_nbytes == stats.activation_nbytes == 24 * itemsize
  assert stats.analytic_nbytes() == stats.residual_nbytes
  np.testing.assert_array_equal(stats.needed_ranks, [2, 3, 4])
  np.testing.assert_array_equal(stats.kept_ranks, [2, 3, 4])
  np.testing.assert_array_equal(stats.kept_energy, 1.0)
  assert not bool(stats.overflow)
  assert stats.capacity == (None,) * 3 and stats.method == "none"
  assert stats_lib.uncompressed((2, 3), dtype, "quant",
                                7).residual_nbytes == 7


def test_report_overflow_warns_raises_or_ignores():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 6, 7)),
                  jnp.float32)
  _, stats = hosvd.tucker_compress(x, (1, 1, None), 0.95, "hosvd")
  assert bool(stats.overflow)
  with pytest.warns(lv.RankOverflowWarning, match="eps=0.95"):
    stats_lib.report_overflow("warn", 0.95, stats)
    jax.effects_barrier()
  with pytest.raises(lv.RankOverflowError,
                     match=r"capacity is \[1, 1, None\]"):
    stats_lib.report_overflow("error", 0.95, stats)
    jax.effects_barrier()
  stats_lib.report_overflow("ignore", 0.95, stats)
  _, fine = hosvd.tucker_compress(x, (5, 6, None), 0.95, "hosvd")
  stats_lib.report_overflow("error", 0.95, fine)
  jax.effects_barrier()


def test_raise_on_overflow_is_the_host_side_check_under_jit():
  """on_overflow="error" under jit surfaces as JaxRuntimeError; this does not.
  """
  import jax
  import jax.numpy as jnp
  import pytest

  import lowrank_vjp as lv
  dn = ("NHWC", "HWIO", "NHWC")
  x = jax.random.normal(jax.random.key(0), (8, 6, 6, 4))
  w = jnp.ones((3, 3, 4, 2))
  tight = lv.compressed_conv(method="hosvd", eps=0.99, ranks=1,
                             on_overflow="ignore")
  step = jax.jit(lambda x, w: tight.with_stats(x, w, (1, 1), "SAME",
                                               dimension_numbers=dn)[1])
  with pytest.raises(lv.RankOverflowError, match="conv1: .*capacity is"):
    lv.raise_on_overflow({"conv1": step(x, w)}, eps=0.99)
  loose = lv.compressed_conv(method="hosvd", eps=1.0)
  stats = jax.jit(lambda x, w: loose.with_stats(x, w, (1, 1), "SAME",
                                                dimension_numbers=dn)[1])(x, w)
  lv.raise_on_overflow(stats)   # nothing to report
