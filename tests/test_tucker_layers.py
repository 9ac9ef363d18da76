"""Tucker kernels, their Flax layers and the adapters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowrank_vjp as lv
from lowrank_vjp import tdlrt as lt
from lowrank_vjp._src.tdlrt import layers as tucker_layers
from lowrank_vjp._src.tdlrt import weight as tw

DN = ("NHWC", "HWIO", "NHWC")


def _orth_err(u, r):
  eye = np.diag((np.arange(u.shape[1]) < r).astype(np.float64))
  return float(np.max(np.abs(np.asarray(u.T @ u, np.float64) - eye)))


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


@pytest.mark.parametrize("ranks,expected", [
    (2, (2, 2, 2, 2)), (0.5, (2, 2, 4, 8)), ((None, 1, 0.25, 3), (3, 1, 2, 3)),
    (100, (3, 3, 8, 16))])
def test_capacities(ranks, expected):
  assert lt.capacities((3, 3, 8, 16), ranks) == expected


@pytest.mark.parametrize("ranks", [0, 1.5, (1, 2), "a", True])
def test_capacities_rejects(ranks):
  with pytest.raises(ValueError):
    lt.capacities((3, 3, 8, 16), ranks)


@pytest.mark.parametrize("factorization,stride,padding", [
    ("tucker", 1, "SAME"), ("tucker", 2, ((1, 0), (0, 1))),
    ("matrix", 2, "VALID")])
def test_conv_forward_paths_agree(factorization, stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 6))
  outs = []
  for forward in ("kernel", "factored"):
    conv = lt.TuckerConv(5, (3, 3), ranks=0.5, factorization=factorization,
                         strides=stride, padding=padding, forward=forward)
    params = jax.jit(conv.init)(jax.random.key(1), x)["params"]
    outs.append(jax.jit(conv.apply)({"params": params}, x))
  ref = lax.conv_general_dilated(x, params["kernel"].kernel(), (stride,) * 2,
                                 padding, dimension_numbers=DN)
  np.testing.assert_allclose(outs[0], ref + params["bias"], atol=1e-5)
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_conv_auto_picks_factored_when_cheaper():
  w = lt.TuckerWeight(np.zeros((3, 3, 8, 8)), tuple(
      np.zeros((n, r)) for n, r in ((3, 3), (3, 3), (64, 8), (64, 8))),
                      shape=(3, 3, 64, 64))
  full, fact = tucker_layers.conv_macs(w, (3, 3), 64, 64, "tucker")
  assert fact < full


def test_conv_with_compressed_conv_matches_plain_gradient():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  plain = lt.TuckerConv(4, (3, 3), ranks=(3, 3, 2, 2), forward="kernel")
  comp = plain.copy(conv_general_dilated=lv.compressed_conv(eps=1.0))
  params = jax.jit(plain.init)(jax.random.key(1), x)["params"]
  grads = [jax.jit(jax.grad(
      lambda p, m=m: jnp.sum(m.apply({"params": p}, x) ** 2)))(params)
           for m in (plain, comp)]
  for a, b in zip(jax.tree_util.tree_leaves(grads[0]),
                  jax.tree_util.tree_leaves(grads[1]), strict=False):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dense_forward_paths_agree():
  x = jax.random.normal(jax.random.key(0), (3, 5, 12))
  outs = []
  for forward in ("kernel", "factored"):
    dense = lt.TuckerDense(7, ranks=(3, 2), forward=forward)
    params = jax.jit(dense.init)(jax.random.key(1), x)["params"]
    outs.append(jax.jit(dense.apply)({"params": params}, x))
  np.testing.assert_allclose(
      outs[0], x @ params["kernel"].kernel() + params["bias"], atol=1e-5)
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_layer_accepts_pretrained_tucker_param():
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
  x = jax.random.normal(jax.random.key(1), (1, 5, 5, 4))
  conv = lt.TuckerConv(8, (3, 3), use_bias=False, ranks=None)
  params = {"kernel": jax.jit(
      lambda k: lt.tucker_from_kernel(k, ranks=None))(kernel)}
  y = jax.jit(conv.apply)({"params": params}, x)
  ref = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                 dimension_numbers=DN)
  np.testing.assert_allclose(y, ref, atol=1e-4)


def test_basis_form_value_and_gradient(x64):
  """``∂L/∂U_i = ∂L/∂K_i · S_iᵀ`` with ``unfold(C, i) = S_i Q_iᵀ``."""
  w = lt.random_tucker(jax.random.key(0), (3, 4, 5), (3, 3, 4),
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
      s = tw.unfold(w.core, i) @ q               # [R_i, R_i]
      out.append((gk[i] @ s.T, gu[i], gk[i]))
    return out

  for i, (a, b, gk) in enumerate(check(w.factors)):
    np.testing.assert_allclose(a, b, atol=1e-12)
    assert np.all(np.asarray(gk)[:, ranks[i]:] == 0)


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


@pytest.mark.parametrize("kind", ["tucker", "lora"])
def test_adapters_start_at_base_and_freeze_it(kind):
  base = jax.random.normal(jax.random.key(0), (3, 3, 4, 6))
  if kind == "tucker":
    w = lt.tucker_adapter(jax.random.key(1), base, (3, 3, 2, 2))
  else:
    w = lt.lora_adapter(jax.random.key(1), base, 2, alpha=4.0)
    assert w.num_params == 2 * (36 + 6) and w.scale == 2.0
  np.testing.assert_allclose(jax.jit(lt.materialize)({"k": w})["k"], base)
  g = jax.jit(jax.grad(lambda w: jnp.sum(w.kernel() ** 3)))(w)
  assert np.all(np.asarray(g.base) == 0)
