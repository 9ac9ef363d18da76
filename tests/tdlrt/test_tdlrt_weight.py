"""Tucker kernels: TuckerWeight, its initialisers, capacities, materialize."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_vjp import tdlrt as lt
from lowrank_vjp._src.tdlrt import weight as tw
from lowrank_vjp._src.tensor import algebra


def _orth_err(u, r):
  eye = np.diag((np.arange(u.shape[1]) < r).astype(np.float64))
  return float(np.max(np.abs(np.asarray(u.T @ u, np.float64) - eye)))


def _normal(key, shape, dtype=jnp.float64):
  return jax.random.normal(jax.random.key(key), shape, dtype)


def _random_tucker(key, shape, ranks, **kwargs):
  """``lt.random_tucker`` jitted, for the tests that only need a weight (op
  by op, it compiled each of its operations on its own; the tests of the
  initialiser below call it as users do)."""
  return jax.jit(lambda key: lt.random_tucker(key, shape, ranks, **kwargs))(
      key)


# ------------------------------------------------- the kernel it stands for


def test_kernel_is_the_hand_built_tucker_tensor(x64):
  """``W = core ×₀ U₀ ×₁ U₁ ×₂ U₂ ×₃ U₃``, for any (not only orthonormal) U."""
  core = _normal(0, (2, 3, 4, 5))
  factors = tuple(_normal(1 + i, (n, r)) for i, (n, r) in
                  enumerate(zip((3, 3, 6, 8), core.shape, strict=True)))
  w = lt.TuckerWeight(core, factors, shape=(3, 3, 6, 8))
  ref = jnp.einsum("abcd,ia,jb,kc,ld->ijkl", core, *factors)
  np.testing.assert_allclose(w.kernel(), ref, rtol=1e-12, atol=1e-12)
  assert w.kernel().dtype == jnp.float64
  assert w.kernel(jnp.float32).dtype == jnp.float32


def test_matrix_kernel_is_reshaped_u0_core_u1t(x64):
  """``"matrix"``: ``reshape(U₀ · core · U₁ᵀ, [KH, KW, I, O])``."""
  shape = (3, 3, 4, 6)
  modes = lt.mode_sizes(shape, "matrix")
  assert modes == (36, 6)
  core = _normal(0, (5, 4))
  u0, u1 = _normal(1, (36, 5)), _normal(2, (6, 4))
  w = lt.TuckerWeight(core, (u0, u1), shape=shape)
  np.testing.assert_allclose(w.kernel(), (u0 @ core @ u1.T).reshape(shape),
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,factorization,expected", [
    ((3, 3, 4, 6), "tucker", (3, 3, 4, 6)),
    ((3, 3, 4, 6), "matrix", (36, 6)),
    ((12, 5), "matrix", (12, 5)),
    ((7,), "matrix", (7,)),
    ((7,), "tucker", (7,))])
def test_mode_sizes(shape, factorization, expected):
  assert lt.mode_sizes(shape, factorization) == expected


def test_mode_sizes_rejects():
  with pytest.raises(ValueError, match="factorization must be one of"):
    lt.mode_sizes((3, 4), "cp")
  with pytest.raises(ValueError, match="at least one axis"):
    lt.mode_sizes((), "tucker")


def test_unknown_form_is_an_error():
  with pytest.raises(ValueError, match="form must be one of"):
    lt.TuckerWeight(jnp.ones((1, 1)), (jnp.ones((2, 1)), jnp.ones((3, 1))),
                    shape=(2, 3), form="dense")


def test_pytree_children_and_static_fields():
  w = lt.random_tucker(jax.random.key(0), (4, 5, 6), (2, 3, 4))
  leaves, treedef = jax.tree_util.tree_flatten(w)
  assert len(leaves) == 4
  assert leaves[0] is w.core
  assert all(a is b for a, b in zip(leaves[1:], w.factors, strict=True))
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert back.shape == (4, 5, 6) and back.form == "factors"
  # Static fields take part in the treedef: another form is another tree.
  basis = w.with_form("basis", (0, 2))
  assert basis.form == "basis" and basis.basis_modes == (0, 2)
  assert jax.tree_util.tree_structure(basis) != treedef
  assert basis.core is w.core


# --------------------------------------- ranks, masks, counts and bytes --


def test_ranks_masks_counts_and_bytes():
  shape, cap, init = (3, 8, 10), (3, 5, 6), (2, 4, 3)
  w = jax.jit(lambda key: lt.random_tucker(key, shape, cap,
                                           init_ranks=init))(
                                               jax.random.key(0))
  assert w.modes == shape and w.capacity == cap
  assert w.core.shape == cap
  assert [u.shape for u in w.factors] == list(zip(shape, cap, strict=True))
  np.testing.assert_array_equal(w.ranks(), init)
  np.testing.assert_array_equal(tw.active_ranks(w.factors), init)
  for u, r in zip(w.factors, init, strict=True):
    assert _orth_err(u, r) < 1e-5
    assert np.all(np.asarray(u)[:, r:] == 0)
  core = np.asarray(w.core)
  active = np.zeros(cap, bool)
  active[:2, :4, :3] = True
  assert np.all(core[~active] == 0) and np.all(core[active] != 0)
  # Parameters of the active rank-r tensor: Π r_i + Σ n_i r_i.
  expected = 2 * 4 * 3 + (3 * 2 + 8 * 4 + 10 * 3)
  assert int(w.num_params()) == expected == lt.param_count(shape, init)
  # Bytes at capacity: itemsize · (Π R_i + Σ n_i R_i).
  assert w.nbytes == 4 * (3 * 5 * 6 + 3 * 3 + 8 * 5 + 10 * 6)


def test_init_ranks_are_capped_at_the_capacity():
  w = lt.random_tucker(jax.random.key(1), (4, 6), (2, 3), init_ranks=5)
  np.testing.assert_array_equal(w.ranks(), [2, 3])
  w = lt.random_tucker(jax.random.key(1), (4, 6), (2, 3), init_ranks=0.5)
  np.testing.assert_array_equal(w.ranks(), [2, 3])
  w = lt.random_tucker(jax.random.key(1), (4, 6), (2, 3),
                       init_ranks=(1, None))
  np.testing.assert_array_equal(w.ranks(), [1, 3])


# ------------------------------------------------------------ capacities


@pytest.mark.parametrize("ranks,expected", [
    (2, (2, 2, 2, 2)), (0.5, (2, 2, 4, 8)), ((None, 1, 0.25, 3), (3, 1, 2, 3)),
    (100, (3, 3, 8, 16))])
def test_capacities(ranks, expected):
  assert lt.capacities((3, 3, 8, 16), ranks) == expected


@pytest.mark.parametrize("ranks", [0, 1.5, (1, 2), "a", True])
def test_capacities_rejects(ranks):
  with pytest.raises(ValueError):
    lt.capacities((3, 3, 8, 16), ranks)


@pytest.mark.parametrize("ranks,message", [
    ((1, 2), r"2 entries.*4 modes"),
    (0, r"ranks must be >= 1, got 0"),
    ((2, -1, 2, 2), r"ranks must be >= 1, got \(2, -1, 2, 2\)"),
    (1.5, r"a fractional rank must lie in \(0, 1\], got 1.5"),
    ((0.5, 0.0, 1, 1), r"a fractional rank must lie in \(0, 1\], got 0.0"),
    ("a", r"ranks must be ints, floats or None, got 'a'"),
    (True, r"ranks must be ints, floats or None, got True"),
    ((1, 1, False, 1), r"ranks must be ints, floats or None")])
def test_capacities_error_messages(ranks, message):
  with pytest.raises(ValueError, match=message):
    lt.capacities((3, 3, 8, 16), ranks)


def test_capacities_accepts_lists_and_numpy_scalars():
  assert lt.capacities((3, 8), [np.int64(2), np.float32(0.5)]) == (2, 4)
  assert lt.capacities([3, 8], None) == (3, 8)
  assert all(isinstance(r, int) for r in lt.capacities((3, 8), 0.3))


def test_capacities_of_a_matrix_factorization():
  """The capacity caps at the mode size, not at the unfolding's rank."""
  modes = lt.mode_sizes((3, 3, 4, 6), "matrix")
  assert lt.capacities(modes, None) == (36, 6)
  assert lt.capacities(modes, 0.5) == (18, 3)
  w = _random_tucker(jax.random.key(0), (3, 3, 4, 6), 0.5,
                     factorization="matrix")
  assert w.capacity == (18, 3) and w.kernel().shape == (3, 3, 4, 6)


# ------------------------------------------------------- initialisers ----


@pytest.mark.parametrize("factorization", ["tucker", "matrix"])
def test_from_kernel_full_rank_is_exact(x64, factorization):
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 6), jnp.float64)
  w = jax.jit(lambda k: lt.tucker_from_kernel(
      k, ranks=None, factorization=factorization))(kernel)
  np.testing.assert_allclose(w.kernel(), kernel, atol=1e-12)
  assert w.modes == tw.mode_sizes(kernel.shape, factorization)
  for u, r in zip(w.factors, np.asarray(w.ranks()), strict=False):
    assert _orth_err(u, r) < 1e-12


def test_from_kernel_truncates_and_masks(x64):
  # An exactly rank-(2, 2, 3, 3) kernel is recovered at those ranks.
  low = jax.jit(lambda key: lt.random_tucker(
      key, (3, 3, 8, 8), (2, 2, 3, 3), dtype=jnp.float64).kernel())(
          jax.random.key(1))
  w = jax.jit(lambda k: lt.tucker_from_kernel(
      k, ranks=(3, 3, 5, 5), init_ranks=(2, 2, 3, 3)))(low)
  assert w.capacity == (3, 3, 5, 5)
  np.testing.assert_array_equal(w.ranks(), [2, 2, 3, 3])
  np.testing.assert_allclose(w.kernel(), low, atol=1e-12)
  assert np.all(np.asarray(w.core)[2:] == 0)
  assert np.all(np.asarray(w.factors[3])[:, 3:] == 0)


def test_from_kernel_is_the_truncated_hosvd(x64):
  kernel = _normal(2, (3, 3, 6, 8))
  w = lt.tucker_from_kernel(kernel, ranks=(2, 3, 4, 5))
  core, factors = algebra.truncated_hosvd(kernel, (2, 3, 4, 5))
  np.testing.assert_allclose(w.kernel(), algebra.tucker_product(core, factors),
                             atol=1e-12)
  # Matrix form: the truncated SVD of the [KH·KW·I, O] reshape.
  w = lt.tucker_from_kernel(kernel, ranks=(4, 4), factorization="matrix")
  u, s, vt = np.linalg.svd(np.asarray(kernel).reshape(54, 8),
                           full_matrices=False)
  best = (u[:, :4] * s[:4]) @ vt[:4]
  np.testing.assert_allclose(w.kernel(), best.reshape(kernel.shape),
                             atol=1e-12)
  assert w.kernel().dtype == kernel.dtype


def test_random_tucker_scale_and_orthonormality():
  w = jax.jit(lambda key: lt.random_tucker(key, (3, 3, 32, 64),
                                           ranks=(3, 3, 16, 32)))(
                                               jax.random.key(0))
  k = np.asarray(jax.jit(lambda w: w.kernel())(w))
  # Same expected Frobenius norm as LeCun normal: numel / fan_in.
  expected = k.size / (3 * 3 * 32)
  assert 0.7 < np.sum(k ** 2) / expected < 1.3
  for u in w.factors:
    assert _orth_err(u, u.shape[1]) < 1e-5
  assert w.nbytes == 4 * (3 * 3 * 16 * 32 + 9 + 9 + 32 * 16 + 64 * 32)
  assert int(w.num_params()) == lt.param_count(w.modes, (3, 3, 16, 32))


def test_random_tucker_stddev_and_dtype(x64):
  w = lt.random_tucker(jax.random.key(3), (16, 32, 32), (8, 8, 8),
                       init_ranks=(4, 8, 8), stddev=0.5, dtype=jnp.float64)
  assert w.core.dtype == jnp.float64
  assert all(u.dtype == jnp.float64 for u in w.factors)
  k = np.asarray(w.kernel())
  assert 0.8 < np.mean(k ** 2) / 0.25 < 1.2
  # Same key and settings, same weight.
  again = lt.random_tucker(jax.random.key(3), (16, 32, 32), (8, 8, 8),
                           init_ranks=(4, 8, 8), stddev=0.5,
                           dtype=jnp.float64)
  np.testing.assert_array_equal(again.kernel(), k)


# ------------------------------------------------------------ basis form


def test_basis_form_value_and_gradient(x64):
  """``∂L/∂U_i = ∂L/∂K_i · S_iᵀ`` with ``unfold(C, i) = S_i Q_iᵀ``."""
  w = _random_tucker(jax.random.key(0), (3, 4, 5), (3, 3, 4),
                     init_ranks=(2, 3, 3), dtype=jnp.float64)
  target = jax.random.normal(jax.random.key(1), (3, 4, 5), jnp.float64)
  loss = lambda fs, form: jnp.sum(jnp.sin(lt.TuckerWeight(
      w.core, fs, w.shape, form).kernel() - target) ** 2)
  np.testing.assert_allclose(
      w.with_form("basis").kernel(), w.kernel(), atol=1e-14)
  ranks = np.asarray(w.ranks())

  @jax.jit
  def check(factors):
    gu = jax.grad(loss)(factors, "factors")
    gk = jax.grad(loss)(factors, "basis")
    out = []
    for i in range(3):
      q = tw._row_basis(w.core, i, ranks[i])  # pylint: disable=protected-access
      s = algebra.unfold(w.core, i) @ q          # [R_i, R_i]
      out.append((gk[i] @ s.T, gu[i], gk[i]))
    return out

  for i, (a, b, gk) in enumerate(check(w.factors)):
    np.testing.assert_allclose(a, b, atol=1e-12)
    assert np.all(np.asarray(gk)[:, ranks[i]:] == 0)


def test_basis_modes_limit_which_factors_get_gradients(x64):
  w = _random_tucker(jax.random.key(2), (3, 4, 5), (2, 3, 3),
                     dtype=jnp.float64)
  grads = jax.jit(jax.grad(lambda ws: jnp.sum(ws.kernel() ** 2)))(
      w.with_form("basis", (1,)))
  assert np.all(np.asarray(grads.factors[0]) == 0)
  assert np.all(np.asarray(grads.factors[2]) == 0)
  assert np.any(np.asarray(grads.factors[1]) != 0)
  # The core gets no gradient in basis form (the Galerkin step trains it).
  assert np.all(np.asarray(grads.core) == 0)


# ----------------------------------------------------------- materialize


def test_materialize_a_nested_tree(x64):
  w = _random_tucker(jax.random.key(0), (3, 3, 2, 4), 0.5,
                     dtype=jnp.float64)
  base = _normal(1, (6, 5))
  lora = lt.lora_adapter(jax.random.key(2), base, 2)
  lora = lt.LoRAWeight(lora.base, lora.a, _normal(3, (2, 5)), lora.scale)
  adapter = lt.tucker_adapter(jax.random.key(4), _normal(5, (4, 3)), 2)
  bias = jnp.arange(4.0)
  params = {"conv": {"kernel": w, "bias": bias},
            "heads": [{"kernel": lora}, {"kernel": adapter}],
            "step": 3}
  out = jax.jit(lt.materialize)(params)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(
      {"conv": {"kernel": 0, "bias": 0},
       "heads": [{"kernel": 0}, {"kernel": 0}], "step": 0})
  np.testing.assert_array_equal(out["conv"]["kernel"], w.kernel())
  np.testing.assert_array_equal(out["conv"]["bias"], bias)
  np.testing.assert_allclose(out["heads"][0]["kernel"], lora.kernel(),
                             atol=1e-14)
  np.testing.assert_allclose(out["heads"][1]["kernel"], adapter.kernel(),
                             atol=1e-14)
  assert int(out["step"]) == 3
  low = lt.materialize(params, jnp.float32)
  assert low["conv"]["kernel"].dtype == jnp.float32
  assert low["heads"][1]["kernel"].dtype == jnp.float32
  assert low["conv"]["bias"].dtype == jnp.float64   # not a kernel: untouched
  assert tw.is_structured(w) and tw.is_structured(lora)
  assert not tw.is_structured(bias)


def test_materialize_and_unchanged_model():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.Conv(4, (3, 3))(x).mean((1, 2)))

  x = jnp.ones((2, 5, 5, 2))
  params = jax.jit(Net().init)(jax.random.key(0), x)["params"]

  @jax.jit
  def both(params):
    fact = dict(params)
    fact["Conv_0"] = dict(params["Conv_0"])
    fact["Conv_0"]["kernel"] = lt.tucker_from_kernel(
        params["Conv_0"]["kernel"], ranks=None)
    return (Net().apply({"params": lt.materialize(fact)}, x),
            Net().apply({"params": params}, x))

  y, ref = both(params)
  np.testing.assert_allclose(y, ref, atol=1e-5)


def test_materialize_passes_gradients_to_core_and_factors(x64):
  w = _random_tucker(jax.random.key(6), (4, 5), (2, 3), dtype=jnp.float64)
  g = jax.jit(jax.grad(lambda p: jnp.sum(lt.materialize(p)["k"] ** 2)))(
      {"k": w})["k"]
  assert isinstance(g, lt.TuckerWeight)
  # ∂‖W‖²/∂core = 2 · W ×ᵢ Uᵢᵀ.
  ref = 2.0 * algebra.tucker_product(w.kernel(),
                                     [u.T for u in w.factors])
  np.testing.assert_allclose(g.core, ref, atol=1e-12)
