"""lowrank_vjp.models.GPT: the nanoGPT-layout causal LM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
import lowrank_vjp.rules as lvr
from lowrank_vjp import models

KW = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)
TOKENS = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 32)


def _loss_and_grads(model, params):
  def loss(p):
    logits, _ = model.apply({"params": p}, TOKENS, mutable=["compression"])
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params)
  return logits, grads


def test_lean_and_vanilla_models_share_variables_and_agree():
  vanilla = models.GPT.vanilla(**KW)
  params = vanilla.init(jax.random.PRNGKey(1), TOKENS)["params"]
  exact = models.GPT(norm_method=None, activation="jax", **KW)
  y0, g0 = _loss_and_grads(vanilla, params)
  y1, g1 = _loss_and_grads(exact, params)   # same params, exact neighbours
  np.testing.assert_allclose(y1, y0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  lean = models.GPT(**KW)                   # codes: approximate gradients
  y2, g2 = _loss_and_grads(lean, params)
  np.testing.assert_allclose(y2, y0, atol=1e-5)   # the forward is exact
  err = max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
            for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g0)))
  assert err < 0.1, err


def test_module_paths_follow_nanogpt():
  model = models.GPT(**KW)
  layers = lvr.discover(model, TOKENS)
  paths = {l.path for l in layers}
  for p in ("wte", "wpe", "h_0/ln_1", "h_0/attn/c_attn", "h_0/attn/c_proj",
            "h_1/ln_2", "h_1/mlp/c_fc", "h_1/mlp/c_proj", "ln_f"):
    assert p in paths, sorted(paths)
  plan = lvr.plan(model, [lvr.Rule(r".*/(c_attn|c_fc|c_proj)", "hosvd")],
                  TOKENS)
  assert len(plan.compressed) == 8


@pytest.mark.parametrize("remat", ["full", "compressed"])
def test_remat_keeps_values_and_gradients(remat):
  params = models.GPT(**KW).init(jax.random.PRNGKey(1), TOKENS)["params"]
  y0, g0 = _loss_and_grads(models.GPT(**KW), params)
  y1, g1 = _loss_and_grads(models.GPT(remat=remat, **KW), params)
  np.testing.assert_allclose(y1, y0, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="attention must be"):
    models.GPT(attention="flash", **KW).init(jax.random.PRNGKey(0), TOKENS)
  with pytest.raises(ValueError, match="multiple of n_head"):
    models.GPT(**{**KW, "n_head": 3}).init(jax.random.PRNGKey(0), TOKENS)
  with pytest.raises(ValueError, match="longer than block_size"):
    models.GPT(**KW).init(jax.random.PRNGKey(0), jnp.zeros((1, 17), int))
  with pytest.raises(ValueError, match="remat must be"):
    models.GPT(remat="yes", **KW).init(jax.random.PRNGKey(0), TOKENS)
