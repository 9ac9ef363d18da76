"""The shared Tucker algebra: unfoldings, mode products, masks, bases, HOSVD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_vjp._src.tensor import algebra

SHAPES = [(4, 5), (2, 3, 4), (3, 1, 4, 2)]


def _normal(key, shape, dtype=jnp.float64):
  return jax.random.normal(jax.random.key(key), shape, dtype)


def _orth_err(u, keep):
  u = np.asarray(u, np.float64)
  eye = np.diag(np.asarray(keep, np.float64))
  return float(np.max(np.abs(u.T @ u - eye)))


# ------------------------------------------------------ unfold and fold --


@pytest.mark.parametrize("shape", SHAPES)
def test_unfold_rows_are_the_mode_slices(shape):
  """Row ``i`` of ``unfold(x, mode)`` is ``x[..., i, ...]`` in C order."""
  x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  for mode, n in enumerate(shape):
    m = np.asarray(algebra.unfold(x, mode))
    assert m.shape == (n, x.size // n)
    for i in range(n):
      np.testing.assert_array_equal(m[i], np.take(x, i, axis=mode).ravel())


@pytest.mark.parametrize("shape", SHAPES)
def test_fold_inverts_unfold(shape):
  x = _normal(0, shape, jnp.float32)
  for mode in range(len(shape)):
    m = algebra.unfold(x, mode)
    np.testing.assert_array_equal(algebra.fold(m, mode, shape), x)
    np.testing.assert_array_equal(
        algebra.unfold(algebra.fold(m, mode, shape), mode), m)


def test_unfold_and_fold_under_jit():
  x = _normal(1, (2, 3, 4), jnp.float32)
  y = jax.jit(lambda x: algebra.fold(algebra.unfold(x, 2), 2, x.shape))(x)
  np.testing.assert_array_equal(y, x)


# ------------------------------------------------------------ mode_dot --

_LETTERS = "abcd"


@pytest.mark.parametrize("shape", SHAPES)
def test_mode_dot_matches_einsum(x64, shape):
  x = _normal(2, shape)
  for mode, k in enumerate(shape):
    mat = _normal(3 + mode, (6, k))
    idx = _LETTERS[:len(shape)]
    out = idx[:mode] + "z" + idx[mode + 1:]
    ref = jnp.einsum(f"z{idx[mode]},{idx}->{out}", mat, x)
    y = algebra.mode_dot(x, mat, mode)
    assert y.shape == shape[:mode] + (6,) + shape[mode + 1:]
    np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-13)
    # The same product through the unfolding.
    np.testing.assert_allclose(
        y, algebra.fold(mat @ algebra.unfold(x, mode), mode, y.shape),
        rtol=1e-13, atol=1e-13)


# ------------------------------------------------------ tucker_product --


def test_tucker_product_matches_hand_built_einsum_order3(x64):
  # Mixed growth: one mode expands, one shrinks (R > n), one stays.
  core = _normal(0, (2, 5, 3))
  factors = [_normal(1, (4, 2)), _normal(2, (3, 5)), _normal(3, (3, 3))]
  ref = jnp.einsum("abc,ia,jb,kc->ijk", core, *factors)
  out = algebra.tucker_product(core, factors)
  assert out.shape == (4, 3, 3)
  np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_tucker_product_matches_hand_built_einsum_order4(x64):
  core = _normal(4, (2, 2, 3, 4))
  factors = [_normal(5 + i, (n, r))
             for i, (n, r) in enumerate([(3, 2), (3, 2), (8, 3), (16, 4)])]
  ref = jnp.einsum("abcd,ia,jb,kc,ld->ijkl", core, *factors)
  np.testing.assert_allclose(algebra.tucker_product(core, factors), ref,
                             rtol=1e-12, atol=1e-12)


def test_tucker_product_order1_and_order2(x64):
  core = _normal(9, (3,))
  u = _normal(10, (5, 3))
  np.testing.assert_allclose(algebra.tucker_product(core, [u]), u @ core,
                             rtol=1e-13)
  core = _normal(11, (2, 3))
  u0, u1 = _normal(12, (4, 2)), _normal(13, (6, 3))
  np.testing.assert_allclose(algebra.tucker_product(core, [u0, u1]),
                             u0 @ core @ u1.T, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------- masks --


def test_rank_mask_mask_columns_and_mask_core():
  mask = np.asarray(algebra.rank_mask((3, 2, 4), (2, 1, 3)))
  ref = np.zeros((3, 2, 4), bool)
  ref[:2, :1, :3] = True
  np.testing.assert_array_equal(mask, ref)
  core = jnp.ones((3, 2, 4))
  np.testing.assert_array_equal(algebra.mask_core(core, (2, 1, 3)), ref)
  u = jnp.ones((5, 4))
  np.testing.assert_array_equal(
      algebra.mask_columns(u, 2),
      np.concatenate([np.ones((5, 2)), np.zeros((5, 2))], axis=1))
  # Traced ranks, one compiled function for every rank.
  f = jax.jit(lambda r: algebra.mask_core(core, r))
  for r in ([3, 2, 4], [1, 1, 1]):
    assert int(jnp.sum(f(jnp.array(r)))) == np.prod(r)
  assert f._cache_size() == 1  # pylint: disable=protected-access


# --------------------------------------------------------- param_count --


@pytest.mark.parametrize("modes,ranks", [
    ((3, 3, 16, 32), (3, 3, 8, 8)), ((36, 6), (4, 5)), ((7,), (2,))])
def test_param_count_formula(modes, ranks):
  expected = int(np.prod(ranks)) + sum(
      n * r for n, r in zip(modes, ranks, strict=True))
  assert algebra.param_count(modes, ranks) == expected
  assert isinstance(algebra.param_count(modes, ranks), int)
  traced = jax.jit(lambda r: algebra.param_count(modes, r))(
      jnp.asarray(ranks, jnp.int32))
  assert int(traced) == expected
  assert int(algebra.param_count(modes, np.asarray(ranks))) == expected


def test_param_count_needs_one_rank_per_mode():
  with pytest.raises(ValueError):
    algebra.param_count((3, 4), (1, 2, 3))


# ------------------------------------------------------ orthonormalize --


def test_orthonormalize_gives_orthonormal_columns(x64):
  v = _normal(0, (9, 5))
  keep = jnp.array([True, True, False, True, False])
  q, h = algebra.orthonormalize(v, keep)
  assert q.shape == (9, 5) and h.shape == (5, 5)
  assert _orth_err(q, keep) < 1e-12
  assert np.all(np.asarray(q)[:, ~np.asarray(keep)] == 0)
  assert np.all(np.asarray(h)[~np.asarray(keep)] == 0)
  np.testing.assert_allclose(h, h.T, atol=1e-13)
  assert np.all(np.linalg.eigvalsh(np.asarray(h)[np.ix_(keep, keep)]) > 0)
  # v = q h on the kept columns, and q is the polar factor (closest
  # orthonormal matrix, no reordering or sign flips).
  kv = np.asarray(v)[:, np.asarray(keep)]
  np.testing.assert_allclose(
      (q @ h)[:, np.asarray(keep)], kv, rtol=1e-12, atol=1e-12)
  u, _, vt = np.linalg.svd(kv, full_matrices=False)
  np.testing.assert_allclose(np.asarray(q)[:, np.asarray(keep)], u @ vt,
                             atol=1e-12)


def test_orthonormalize_leaves_an_orthonormal_matrix_unchanged(x64):
  u, _ = jnp.linalg.qr(_normal(1, (6, 3)))
  q, h = algebra.orthonormalize(u, jnp.ones((3,), bool))
  np.testing.assert_allclose(q, u, atol=1e-13)
  np.testing.assert_allclose(h, jnp.eye(3), atol=1e-13)


# ------------------------------------------------------- leading_basis --


def test_leading_basis_spans_the_column_space(x64):
  # A rank-2 matrix [8, 5]: two directions, three zero singular values.
  m = _normal(2, (8, 2)) @ _normal(3, (2, 5))
  # Through the Gram, a zero singular value comes out near sqrt(eps)·‖m‖.
  rtol = 1e-6 * float(jnp.linalg.norm(m))
  basis, sv, keep = algebra.leading_basis(m, 5, rtol)
  ref = np.linalg.svd(np.asarray(m), compute_uv=False)
  np.testing.assert_allclose(sv, ref, atol=1e-7)
  assert np.all(np.diff(np.asarray(sv)) <= 1e-12)        # descending
  np.testing.assert_array_equal(keep, [True, True, False, False, False])
  assert _orth_err(basis, keep) < 1e-12
  assert np.all(np.asarray(basis)[:, 2:] == 0)
  np.testing.assert_allclose(basis @ (basis.T @ m), m, atol=1e-12)


def test_leading_basis_keeps_at_most_keep_max(x64):
  m = _normal(4, (8, 5))
  basis, sv, keep = algebra.leading_basis(m, 3, 0.0)
  np.testing.assert_array_equal(keep, [True] * 3 + [False] * 2)
  # The kept columns are the leading left singular vectors (up to sign).
  u = np.linalg.svd(np.asarray(m), full_matrices=False)[0][:, :3]
  np.testing.assert_allclose(basis[:, :3] @ basis[:, :3].T, u @ u.T,
                             atol=1e-11)
  # rtol drops the small singular values whatever keep_max allows.
  _, _, keep = algebra.leading_basis(m, 5, float(sv[1]) * (1 + 1e-9))
  np.testing.assert_array_equal(keep, [True] + [False] * 4)


# ----------------------------------------------------- truncated_hosvd --


def test_truncated_hosvd_full_rank_is_exact(x64):
  x = _normal(0, (3, 4, 5))
  core, factors = algebra.truncated_hosvd(x, (3, 4, 5))
  assert core.shape == (3, 4, 5)
  np.testing.assert_allclose(algebra.tucker_product(core, factors), x,
                             atol=1e-12)
  for u in factors:
    assert _orth_err(u, np.ones(u.shape[1])) < 1e-12


def test_truncated_hosvd_pads_past_the_unfolding_rank(x64):
  # Mode 2's unfolding [10, 6] has rank 6 < capacity 10: zero columns.
  x = _normal(1, (2, 3, 10))
  core, factors = algebra.truncated_hosvd(x, (2, 3, 10))
  assert factors[2].shape == (10, 10)
  assert np.all(np.asarray(factors[2])[:, 6:] == 0)
  np.testing.assert_allclose(algebra.tucker_product(core, factors), x,
                             atol=1e-12)


def test_truncated_hosvd_error_decreases_with_rank(x64):
  # Decaying mode spectra so that every rank matters.
  x = _normal(2, (6, 6, 6))
  for i in range(3):
    x = algebra.mode_dot(x, jnp.diag(0.7 ** jnp.arange(6.0)), i)
  errors = []
  for r in range(1, 7):
    core, factors = algebra.truncated_hosvd(x, (6, 6, 6), ranks=(r, r, r))
    approx = algebra.tucker_product(core, factors)
    err = float(jnp.linalg.norm(x - approx))
    errors.append(err)
    # Masked: columns past r and the core outside the active block are zero.
    for u in factors:
      assert np.all(np.asarray(u)[:, r:] == 0)
    assert np.all(np.asarray(algebra.mask_core(core, (r, r, r))) ==
                  np.asarray(core))
    # HOSVD's bound: the error is at most the discarded singular values of
    # every mode's unfolding, summed in squares.
    tails = sum(
        np.sum(np.linalg.svd(np.asarray(algebra.unfold(x, i)),
                             compute_uv=False)[r:] ** 2) for i in range(3))
    assert err <= np.sqrt(tails) * (1 + 1e-9) + 1e-12
  assert all(b < a for a, b in zip(errors[:-1], errors[1:], strict=True))
  assert errors[-1] < 1e-12 * float(jnp.linalg.norm(x))


def test_truncated_hosvd_traced_ranks_match_static(x64):
  x = _normal(3, (4, 5, 6))
  cap = (3, 3, 4)
  static = algebra.truncated_hosvd(x, cap, ranks=(2, 3, 1))
  traced = jax.jit(lambda r: algebra.truncated_hosvd(x, cap, ranks=r))(
      jnp.array([2, 3, 1]))
  np.testing.assert_allclose(algebra.tucker_product(*traced),
                             algebra.tucker_product(*static), atol=1e-12)
