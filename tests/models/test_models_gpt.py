"""lowrank_vjp.models.GPT: the nanoGPT-layout causal LM."""

from __future__ import annotations

import functools

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


def _stacked(params, n):
  """Unscanned ``h_{i}`` parameters stacked into a scanned ``h``."""
  blocks = [params[f"h_{i}"] for i in range(n)]
  out = {k: v for k, v in params.items() if not k.startswith("h_")}
  out["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return out


def test_scanned_blocks_compute_the_same_network():
  flat = models.GPT(**KW)
  params = flat.init(jax.random.PRNGKey(1), TOKENS)["params"]
  scanned = models.GPT(scan=True, **KW)
  shapes = jax.eval_shape(scanned.init, jax.random.PRNGKey(1), TOKENS)
  assert jax.tree.map(jnp.shape, _stacked(params, 2)) == jax.tree.map(
      jnp.shape, shapes["params"])
  y0, g0 = _loss_and_grads(flat, params)
  y1, g1 = _loss_and_grads(scanned, _stacked(params, 2))
  np.testing.assert_allclose(y1, y0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(_stacked(g0, 2)),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_scanned_statistics_reach_the_rank_controller():
  """The stats of a scanned stack are stacked per block; the controller
  sizes each path's shared capacity for the neediest block, and a step run
  at its key keeps ε in every block."""
  from lowrank_vjp import training  # pylint: disable=g-import-not-at-top
  model = models.GPT(scan=True, **KW)
  variables = model.init(jax.random.PRNGKey(1), TOKENS)
  settings = {"method": "hosvd", "eps": 0.95, "on_overflow": "ignore"}
  plan = lvr.plan(model, [lvr.Rule(r"h/(attn|mlp)/(c_attn|c_proj|c_fc)",
                                   settings), lvr.Rule(".*")], TOKENS,
                  variables=variables)
  assert len(plan.compressed) == 4   # one path per dense layer of the stack

  @functools.partial(jax.jit, static_argnames="capacities")
  def stats(v, capacities=None):
    with plan.intercept(), lv.rank_capacities(capacities):
      _, state = model.apply(v, TOKENS, mutable=["compression"])
    return lv.flax.collect_stats(state)

  s = stats(variables)
  fc = s["h/mlp/c_fc"]
  assert fc.calls == 2 and np.shape(fc.needed_ranks) == (2, 3)
  row = training.stats_row(s)
  per_block = sum(x.activation_nbytes for p, x in s.items()
                  if p.startswith("h/mlp") or p.startswith("h/attn"))
  assert row["activation_memory_vanilla_mib"] * training.MiB >= 2 * per_block
  controller = lv.RankController()
  controller.observe(s)
  key = controller.key()
  need = np.asarray(fc.needed_ranks).max(0)
  assert dict(key)["h/mlp/c_fc"][1:] >= tuple(int(n) for n in need[1:])
  again = stats(variables, key)
  assert not any(bool(np.any(x.overflow)) for x in again.values())
