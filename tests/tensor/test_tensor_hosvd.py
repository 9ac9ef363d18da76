"""Tests for lowrank_vjp._src.tensor.hosvd: ε-truncated HOSVD and SVD.

Everything is checked independently with NumPy in float64 from what the
library returns (the masked factors, the rebuilt activation); factors are
never compared to NumPy's factors directly (signs and bases are arbitrary),
only projectors and reconstructions.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
from lowrank_vjp._src.tensor import hosvd as hosvd_lib

# An axis larger than the product of the others goes through the dual Gram.
SHAPES = [(4, 5, 6), (3, 4, 5, 6), (2, 3, 50), (50, 3, 2), (6, 1, 7), (8, 9)]
EPSILONS = [0.3, 0.6, 0.9, 0.99]
TOL = {"float32": 1e-5, "float64": 1e-10}


def _unfold(a, axis):
  a = np.asarray(a, np.float64)
  return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def _spectrum(a, axis):
  """Cumulative explained variance of the mode-``axis`` unfolding."""
  s = np.linalg.svd(_unfold(a, axis), compute_uv=False)
  energy = s**2
  return np.cumsum(energy) / np.sum(energy)


def _random(shape, seed=0, decay=True):
  """Gaussian tensor, optionally with a decaying spectrum on every mode."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  if decay:
    for axis, n in enumerate(shape):
      scale = 0.6 ** np.arange(n)
      x = x * scale.reshape([-1 if a == axis else 1 for a in range(len(shape))])
  return x


def _full_capacity(shape, method="hosvd"):
  return lv.methods.resolve(method, eps=0.5,
                            rank_fraction=1.0).capacity(shape)


def _compress(x, capacity, eps, method="hosvd"):
  # Eager: the per-op compilations are shared across ε values and tests.
  return hosvd_lib.tucker_compress(x, tuple(capacity), eps, method)


def _tucker(core, factors):
  x = np.asarray(core, np.float64)
  for axis, u in enumerate(factors):
    x = np.moveaxis(np.tensordot(x, u, axes=([axis], [1])), -1, axis)
  return x


def _orthonormal(n, r, rng):
  q, _ = np.linalg.qr(rng.standard_normal((n, r)))
  return q


# ----------------------------------------------------------- eps_rank ---


@pytest.mark.parametrize("eps,rank", [
    (0.1, 1), (0.5, 1), (0.51, 2), (0.75, 2), (0.76, 3), (0.875, 3),
    (0.9, 4), (1.0, 4)])
def test_eps_rank_is_fewest_components_reaching_eps(eps, rank):
  eigvals = jnp.asarray([4.0, 2.0, 1.0, 1.0])  # ratios .5, .75, .875, 1
  got, total = hosvd_lib.eps_rank(eigvals, eps)
  assert int(got) == rank
  assert got.dtype == jnp.int32
  assert float(total) == 8.0


@pytest.mark.parametrize("eigvals", [
    [0.0, 0.0, 0.0], [np.nan, 1.0, 0.0], [np.inf, 1.0, 0.0]])
def test_eps_rank_degenerate_spectrum_gives_rank_one(eigvals):
  got, _ = hosvd_lib.eps_rank(jnp.asarray(eigvals, jnp.float32), 0.9)
  assert int(got) == 1


def test_eps_rank_eps1_keeps_all_despite_rounding():
  # Cumulative sums in float32 can end a hair below 1.
  eigvals = jnp.asarray([1.0, 1e-8, 1e-8, 3e-8], jnp.float32)
  got, _ = hosvd_lib.eps_rank(eigvals, 1.0)
  assert int(got) == 4


# ---------------------------------------------------- mode_gram / project ---


@pytest.mark.parametrize("shape,axis", [((3, 4, 5), 0), ((3, 4, 5), 2),
                                        ((2, 3, 20), 2), ((7, 2), 1)])
@pytest.mark.parametrize("dual", [False, True])
def test_mode_gram_matches_numpy(shape, axis, dual):
  x = _random(shape, decay=False).astype(np.float32)
  a = _unfold(x, axis)
  want = a.T @ a if dual else a @ a.T
  got = hosvd_lib.mode_gram(jnp.asarray(x), axis, dual=dual)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_project_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 5, 6))
  factors = (rng.standard_normal((4, 2)), None, rng.standard_normal((6, 3)))
  got = hosvd_lib.project(jnp.asarray(x, jnp.float32),
                               tuple(None if f is None else
                                     jnp.asarray(f, jnp.float32)
                                     for f in factors))
  want = np.einsum("abc,ai,ck->ibk", x, factors[0], factors[2])
  assert got.shape == (2, 5, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------- kept energy, every mode ---


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kept_energy_reaches_eps_on_every_mode(shape, dtype):
  x_np = _random(shape, seed=len(shape))
  tol = TOL[dtype]
  capacity = _full_capacity(shape)
  with jax.enable_x64(dtype == "float64"):
    x = jnp.asarray(x_np, dtype)
    for eps in EPSILONS:
      res, stats = _compress(x, capacity, eps)
      assert res.core.dtype == x.dtype
      assert not bool(stats.overflow)
      needed = np.asarray(stats.needed_ranks)
      kept = np.asarray(stats.kept_ranks)
      np.testing.assert_array_equal(needed, kept)  # capacity allows
      a_norm2 = np.sum(np.asarray(x, np.float64)**2)
      for axis, cap in enumerate(capacity):
        u = np.asarray(res.factors[axis], np.float64)
        assert u.shape == (shape[axis], cap)
        k = int(kept[axis])
        assert 1 <= k <= min(shape[axis], math.prod(shape) // shape[axis])
        # Columns beyond the ε-rank are masked to exactly zero, the rest are
        # orthonormal.
        assert np.all(u[:, k:] == 0.0)
        np.testing.assert_allclose(u[:, :k].T @ u[:, :k], np.eye(k),
                                   atol=100 * tol)
        # Kept energy, computed independently from the returned factor.
        energy = np.sum((u.T @ _unfold(x, axis))**2) / a_norm2
        assert energy >= eps - tol, (axis, eps, energy)
        assert energy == pytest.approx(float(stats.kept_energy[axis]),
                                       abs=1e-6)  # a float32 statistic
        # Minimal: one fewer component would fall short of ε, and the factor
        # spans the leading subspace (the best energy at rank k).
        cum = _spectrum(x, axis)
        assert energy == pytest.approx(cum[k - 1], abs=10 * tol)
        if k > 1:
          assert cum[k - 2] < eps + tol, (axis, eps, cum)


@pytest.mark.parametrize("shape,axis", [((2, 3, 50), 2), ((40, 2, 3), 0),
                                        ((5, 60), 1)])
def test_dual_gram_factor_spans_leading_subspace(shape, axis):
  """Projector of the dual-Gram factor equals NumPy's leading projector."""
  x = _random(shape, seed=3)
  other = math.prod(shape) // shape[axis]
  assert other < shape[axis]  # the dual path
  factor, needed, kept, energy = hosvd_lib.leading_factor(
      jnp.asarray(x, jnp.float32), axis, other, 0.9)
  k = int(kept)
  assert int(needed) == k
  u = np.asarray(factor, np.float64)[:, :k]
  left, _, _ = np.linalg.svd(_unfold(x, axis), full_matrices=False)
  np.testing.assert_allclose(u @ u.T, left[:, :k] @ left[:, :k].T,
                             atol=1e-4)
  assert float(energy) == pytest.approx(_spectrum(x, axis)[k - 1], abs=1e-5)


# ------------------------------------------------ exactly low-rank input ---


LOW_RANK = [((6, 5, 7), (2, 3, 2)), ((4, 6, 5, 3), (2, 2, 3, 1)),
            ((2, 3, 50), (2, 2, 3)), ((8, 9), (3, 3)), ((5, 4, 40), (1, 2, 2))]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,ranks", LOW_RANK, ids=str)
def test_exactly_low_rank_input_is_rebuilt_exactly(shape, ranks, dtype):
  rng = np.random.default_rng(7)
  core = rng.standard_normal(ranks)
  factors = [_orthonormal(n, r, rng)
             for n, r in zip(shape, ranks, strict=True)]
  x_np = _tucker(core, factors)
  for axis, r in enumerate(ranks):  # the construction has these ranks
    assert np.linalg.matrix_rank(_unfold(x_np, axis)) == r
  eps = 0.9999
  with jax.enable_x64(dtype == "float64"):
    x = jnp.asarray(x_np, dtype)
    res, stats = _compress(x, _full_capacity(shape), eps)
    rebuilt = res.reconstruct()
  np.testing.assert_array_equal(np.asarray(stats.needed_ranks), ranks)
  err = np.linalg.norm(np.asarray(rebuilt, np.float64) - x_np)
  assert err / np.linalg.norm(x_np) <= (1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("method", ["hosvd", "svd"])
@pytest.mark.parametrize("shape", SHAPES + [(1, 5, 4), (3, 1, 1)], ids=str)
def test_eps1_keeps_everything(shape, method):
  x = _random(shape, seed=5, decay=False)
  capacity = lv.methods.resolve(method, eps=1.0).capacity(shape)
  res, stats = _compress(jnp.asarray(x, jnp.float32), capacity, 1.0, method)
  rebuilt = np.asarray(res.reconstruct(), np.float64)
  assert np.linalg.norm(rebuilt - x) / np.linalg.norm(x) <= 1e-5
  bound = [min(n, math.prod(shape) // n) for n in shape]
  want = [b if c is not None else n
          for b, c, n in zip(bound, capacity, shape, strict=True)]
  # Everything is kept, nothing overflows: the needed rank of a mode cannot
  # exceed the rank its unfolding can have.
  np.testing.assert_array_equal(np.asarray(stats.kept_ranks), want)
  np.testing.assert_array_equal(np.asarray(stats.needed_ranks), want)
  assert not bool(stats.overflow)
  np.testing.assert_allclose(stats.kept_energy, 1.0, atol=1e-5)


# ------------------------------------------------ capacity and overflow ---


def test_capacity_is_respected_and_overflow_flagged():
  shape = (5, 6, 7)
  x = jnp.asarray(_random(shape, seed=9, decay=False), jnp.float32)
  eps = 0.95
  res, stats = _compress(x, (1, 2, None), eps)
  assert res.factors[0].shape == (5, 1)
  assert res.factors[1].shape == (6, 2)
  assert res.factors[2] is None
  assert res.core.shape == (1, 2, 7)
  assert res.shape == shape
  needed = np.asarray(stats.needed_ranks)
  kept = np.asarray(stats.kept_ranks)
  assert needed[0] > 1 and needed[1] > 2  # random data needs more than that
  np.testing.assert_array_equal(kept, [1, 2, 7])
  assert needed[2] == 7
  assert bool(stats.overflow)
  energy = np.asarray(stats.kept_energy)
  assert energy[0] < eps and energy[1] < eps and energy[2] == 1.0
  for axis in (0, 1):  # kept energy is the best possible at the capacity
    assert energy[axis] == pytest.approx(_spectrum(x, axis)[kept[axis] - 1],
                                         abs=1e-5)
  assert stats.capacity == (1, 2, None)
  # Enough capacity: no overflow.
  _, stats = _compress(x, (5, 6, None), eps)
  assert not bool(stats.overflow)


@pytest.mark.parametrize("capacity", [1, 3, 6])
def test_leading_factor_masks_columns_beyond_kept(capacity):
  x = jnp.asarray(_random((6, 4, 5), seed=11), jnp.float32)
  factor, needed, kept, _ = hosvd_lib.leading_factor(x, 0, capacity, 0.9)
  assert factor.shape == (6, capacity)
  assert int(kept) == min(int(needed), capacity)
  f = np.asarray(factor)
  assert np.all(f[:, int(kept):] == 0.0)
  assert np.all(np.linalg.norm(f[:, :int(kept)], axis=0) > 0.99)


# ------------------------------------------- reconstructions, not factors ---


@pytest.mark.parametrize("shape", [(6, 5, 7), (2, 3, 50), (3, 4, 5, 6)],
                         ids=str)
def test_reconstruction_error_shrinks_with_eps_and_obeys_hosvd_bound(shape):
  x_np = _random(shape, seed=13)
  x = jnp.asarray(x_np, jnp.float32)
  norm2 = np.sum(x_np**2)
  errors = []
  for eps in [0.3, 0.5, 0.7, 0.9, 0.99, 1.0]:
    res, stats = _compress(x, _full_capacity(shape), eps)
    err2 = np.sum((np.asarray(res.reconstruct(), np.float64) - x_np)**2)
    # HOSVD: ||x - x̂||² <= Σ_n (discarded energy of mode n).
    discarded = np.sum(1.0 - np.asarray(stats.kept_energy, np.float64))
    assert err2 <= discarded * norm2 * (1 + 1e-4) + 1e-6 * norm2
    errors.append(math.sqrt(err2 / norm2))
  # Nested subspaces: a larger ε never rebuilds worse.
  assert all(b <= a + 1e-6 for a, b in itertools.pairwise(errors)), errors
  assert errors[0] > 0.05 and errors[-1] < 1e-5


@pytest.mark.parametrize("eps", [0.5, 0.9, 0.99])
def test_svd_method_matches_truncated_svd_of_batch_unfolding(eps):
  shape = (8, 3, 4)
  x_np = _random(shape, seed=17)
  res, stats = _compress(jnp.asarray(x_np, jnp.float32), (8, None, None), eps,
                         "svd")
  assert res.factors[1] is None and res.factors[2] is None
  assert res.core.shape == (8, 3, 4)
  k = int(stats.needed_ranks[0])
  cum = _spectrum(x_np, 0)
  assert cum[k - 1] >= eps - 1e-5 and (k == 1 or cum[k - 2] < eps + 1e-5)
  u, s, vt = np.linalg.svd(_unfold(x_np, 0), full_matrices=False)
  best = ((u[:, :k] * s[:k]) @ vt[:k]).reshape(shape)
  np.testing.assert_allclose(res.reconstruct(), best, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(stats.needed_ranks)[1:], [3, 4])


# ------------------------------------------------------------- dtypes ---


def test_bfloat16_core_and_float32_factors():
  x = jnp.asarray(_random((4, 5, 6), seed=19), jnp.bfloat16)
  res, stats = _compress(x, (4, 5, 6), 0.9)
  assert res.core.dtype == jnp.bfloat16
  assert all(f.dtype == jnp.float32 for f in res.factors)
  assert stats.itemsize == 2
  assert stats.kept_energy.dtype == jnp.float32


def test_float64_factors_under_x64(x64):
  x = jnp.asarray(_random((4, 5, 6), seed=19), jnp.float64)
  res, _ = _compress(x, (4, 5, 6), 0.9)
  assert res.core.dtype == jnp.float64
  assert all(f.dtype == jnp.float64 for f in res.factors)


# ---------------------------------------------------- degenerate inputs ---


@pytest.mark.parametrize("method,capacity", [("hosvd", (3, 4, 5)),
                                             ("svd", (3, None, None))])
@pytest.mark.parametrize("eps", [0.9, 1.0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_all_zero_input(method, capacity, eps, dtype):
  x = jnp.zeros((3, 4, 5), dtype)
  res, stats = _compress(x, capacity, eps, method)
  assert np.all(np.asarray(res.core, np.float32) == 0.0)
  for f in res.factors:
    assert f is None or np.all(np.isfinite(np.asarray(f)))
  assert np.all(np.asarray(res.reconstruct(), np.float32) == 0.0)
  for field in (stats.needed_ranks, stats.kept_ranks, stats.kept_energy):
    assert np.all(np.isfinite(np.asarray(field)))
  np.testing.assert_array_equal(stats.kept_energy, 1.0)
  assert not bool(stats.overflow)
  if eps < 1:
    assert int(stats.needed_ranks[0]) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("method,capacity", [("hosvd", (3, 4, 5)),
                                             ("svd", (3, None, None))])
def test_non_finite_input_does_not_crash(bad, method, capacity):
  x = np.asarray(_random((3, 4, 5), seed=23), np.float32)
  x[1, 2, 3] = bad
  res, stats = _compress(jnp.asarray(x), capacity, 0.9, method)
  assert res.shape == (3, 4, 5)
  assert stats.needed_ranks.shape == (3,)
  # The statistics say the step is unusable rather than claiming success.
  compressed = [a for a, c in enumerate(capacity) if c is not None]
  assert np.all(np.isnan(np.asarray(stats.kept_energy)[compressed]))


def test_scaled_activation_is_held_once():
  """The power-of-two scaling feeds every mode Gram from one buffer.

  With a multiply, XLA copied the scaling into each Gram's input fusion and
  held one scaled copy of the activation per mode at the same time.
  """
  x = jax.ShapeDtypeStruct((16, 7, 7, 240), jnp.float32)
  w = jax.ShapeDtypeStruct((1, 1, 240, 80), jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")

  def temp(conv):
    def loss(w, x):
      return jnp.sum(jnp.square(conv(x, w, (1, 1), "VALID",
                                     dimension_numbers=dn)))
    return lv.measure.xla_memory(jax.grad(loss), w, x).temp_bytes

  activation = 16 * 7 * 7 * 240 * 4
  vanilla = temp(jax.lax.conv_general_dilated)
  hosvd = temp(lv.compressed_conv(method="hosvd", eps=0.9,
                                  on_overflow="ignore"))
  assert hosvd <= vanilla + 1.25 * activation, (hosvd, vanilla, activation)


def test_middle_axis_gram_is_summed_over_slabs():
  """A middle-axis Gram with I > Q transposes x one slab at a time.

  As one contraction over (P, Q), XLA held two transposed copies of x
  (temp = 2.0 x its bytes for this shape); over 16 slabs, one slab's.
  """
  x = jax.ShapeDtypeStruct((64, 24, 24, 16), jnp.float32)
  nbytes = math.prod(x.shape) * 4
  m = lv.measure.xla_memory(lambda x: hosvd_lib.mode_gram(x, 2), x)
  assert m.temp_bytes < 0.5 * nbytes, m.temp_bytes / nbytes
  xs = _random((32, 24, 5), decay=False).astype(np.float32)
  a = _unfold(xs, 1)
  np.testing.assert_allclose(hosvd_lib.mode_gram(jnp.asarray(xs), 1),
                             a @ a.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("p,want", [(64 * 24, 16), (17, 17), (1000, 20),
                                    (257, 1), (7, 1)])
def test_gram_slab_count(p, want):
  assert hosvd_lib._gram_chunks(p) == want  # pylint: disable=protected-access


# --------------------------------------- matmul precision (TF32, bf16) ---


def _dot_precisions(jaxpr):
  """The ``precision`` of every dot_general in ``jaxpr``, sub-jaxprs too."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn.params["precision"])
    for v in eqn.params.values():
      if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        found.extend(_dot_precisions(v.jaxpr))
      elif hasattr(v, "eqns"):
        found.extend(_dot_precisions(v))
  return found


@pytest.mark.parametrize("method,capacity", [("hosvd", (3, 4, 5)),
                                             ("svd", (3, None, None))])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_grams_and_projections_run_at_highest_whatever_the_default(
    method, capacity, dtype):
  # A GPU's default float32 matmul is TF32 (10 mantissa bits); a Gram taken
  # at it would move the eigenvalues, hence the ranks ε picks. Every
  # contraction of the compression names HIGHEST, so neither the default
  # nor a narrow activation dtype changes what it computes in.
  x = jnp.asarray(_random((3, 4, 5), seed=29), dtype)
  with jax.default_matmul_precision("tensorfloat32"):
    jaxpr = jax.make_jaxpr(lambda x: hosvd_lib.tucker_compress(
        x, capacity, 0.9, method))(x).jaxpr
  precisions = _dot_precisions(jaxpr)
  assert precisions  # the Grams are dot_generals
  highest = jax.lax.Precision.HIGHEST
  for p in precisions:
    assert p is not None and all(q == highest for q in p), p
