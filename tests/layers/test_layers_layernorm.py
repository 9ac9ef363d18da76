"""LayerNorm and RMSNorm with a written-out backward (layers/layernorm.py)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf

X = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 32)) * 2.0 + 0.5


@functools.partial(jax.jit, static_argnums=0)
def _run(module, x=X):
  # Jitted: op by op, every operation compiled on its own (seconds a test).
  params = module.init(jax.random.PRNGKey(1), x)["params"]
  params = jax.tree.map(
      lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

  def loss(p, x):
    y, _ = module.apply({"params": p}, x, mutable=["compression"])
    return jnp.sum(jnp.tanh(y.astype(jnp.float32)) * w), y

  (_, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
  return y, grads


def _close(a, b, tol):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=tol,
                               atol=tol * float(jnp.max(jnp.abs(v))))


@pytest.mark.parametrize("ours,ref", [
    (lvf.LayerNorm(method=None), nn.LayerNorm()),
    (lvf.LayerNorm(method=None, use_fast_variance=False),
     nn.LayerNorm(use_fast_variance=False)),
    (lvf.LayerNorm(method=None, reduction_axes=(1, 2), feature_axes=-1),
     nn.LayerNorm(reduction_axes=(1, 2), feature_axes=-1)),
    (lvf.RMSNorm(method=None), nn.RMSNorm()),
], ids=["layer", "layer-two-pass-variance", "layer-two-axes", "rms"])
def test_exact_mode_equals_flax(ours, ref):
  y0, g0 = _run(ref)
  y1, g1 = _run(ours)
  np.testing.assert_array_equal(y1, y0)
  _close(g1, g0, 2e-5)


@pytest.mark.parametrize("ours,ref", [(lvf.LayerNorm(), nn.LayerNorm()),
                                      (lvf.RMSNorm(), nn.RMSNorm())],
                         ids=["layer", "rms"])
def test_default_codes_bound_the_error_and_keep_a_quarter(ours, ref):
  y0, g0 = _run(ref)
  y1, g1 = _run(ours)
  np.testing.assert_array_equal(y1, y0)          # the forward is exact
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert err < 0.05, err
  params = ours.init(jax.random.PRNGKey(1), X)["params"]
  res = lv.measure.vjp_residual_bytes(
      lambda x: ours.apply({"params": params}, x, mutable=["compression"])[0],
      X)
  stats = 2 * 4 * 16 * 4                         # mean and 1/σ per token
  assert res <= X.size + stats + 64 * 32 + 64
  flax_res = lv.measure.vjp_residual_bytes(
      lambda x: ref.apply({"params": params}, x), X)
  assert flax_res >= X.nbytes


def test_functions_and_stats():
  gamma, beta = jnp.ones(32) * 1.5, jnp.zeros(32)
  np.testing.assert_allclose(
      lv.layer_norm(X, gamma, beta),
      nn.LayerNorm().apply({"params": {"scale": gamma, "bias": beta}}, X),
      atol=1e-6)
  np.testing.assert_allclose(
      lv.rms_norm(X, gamma),
      nn.RMSNorm().apply({"params": {"scale": gamma}}, X), atol=1e-6)
  module = lvf.LayerNorm(name="ln")
  v = module.init(jax.random.PRNGKey(0), X)
  _, state = module.apply(v, X, mutable=["compression"])
  assert lvf.collect_stats(state)[""].method == "quant"


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r"layer_norm: scale must have shape"):
    lv.layer_norm(X, jnp.ones(31), None)
  with pytest.raises(ValueError, match="reduction_axes must be an int"):
    lv.layer_norm(X, None, None, reduction_axes=5)
  with pytest.raises(ValueError, match="stateful"):
    lv.rms_norm(X, None, method="asi")
  with pytest.raises(ValueError, match="mask"):
    lvf.LayerNorm().init(jax.random.PRNGKey(0), X, mask=jnp.ones(X.shape,
                                                                  bool))
