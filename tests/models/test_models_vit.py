"""lowrank_vjp.models.ViT: a small-image Vision Transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
import lowrank_vjp.rules as lvr
from lowrank_vjp import models

KW = dict(num_classes=5, width=24, depth=2, heads=3)
IMAGES = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))


def _grads(model, params):
  def loss(p):
    logits, _ = model.apply({"params": p}, IMAGES, mutable=["compression"])
    return jnp.sum(jnp.sin(logits)), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params)
  return logits, grads


def test_exact_neighbours_equal_the_vanilla_model():
  vanilla = models.ViT.vanilla(**KW)
  # Jitted (op by op, initialisation compiled every operation on its own).
  params = jax.jit(vanilla.init)(jax.random.PRNGKey(1), IMAGES)["params"]
  params = jax.jit(lambda params: jax.tree.map(
      # a non-zero head, so that every gradient flows
      lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
      params))(params)
  y0, g0 = _grads(vanilla, params)
  y1, g1 = _grads(models.ViT(norm_method=None, activation="jax", **KW),
                  params)
  assert y0.shape == (2, 5)
  np.testing.assert_allclose(y1, y0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_widths_paths_and_rules():
  assert (models.ViT.tiny().width, models.ViT.tiny().heads) == (192, 3)
  assert (models.ViT.small().width, models.ViT.small().heads) == (384, 6)
  model = models.ViT(**KW)
  paths = {l.path for l in lvr.discover(model, IMAGES)}
  for p in ("patch_embed", "blocks_0/ln_1", "blocks_0/attn/c_attn",
            "blocks_1/mlp/c_fc", "ln_f", "head"):
    assert p in paths, sorted(paths)
  plan = lvr.plan(model, [lvr.Rule("patch_embed", "hosvd"),
                          lvr.Rule(r".*/(c_attn|c_fc|c_proj)", "quant"),
                          lvr.Rule(".*")], IMAGES)
  assert len(plan.compressed) == 1 + 2 * 4


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="multiples of patch_size"):
    models.ViT(**KW).init(jax.random.PRNGKey(0), IMAGES[:, :15])
  with pytest.raises(ValueError, match="multiple of heads"):
    models.ViT(**{**KW, "width": 25}).init(jax.random.PRNGKey(0), IMAGES)
  with pytest.raises(ValueError, match="activation must be"):
    models.ViT(activation="relu", **KW).init(jax.random.PRNGKey(0), IMAGES)


def test_the_registry_builds_vit_tiny_and_gpt_small():
  vit = models.get_spec("vit_tiny")
  model = vit.build(num_classes=7)
  assert (model.width, model.heads, model.depth, model.patch_size) == (
      192, 3, 12, 4)
  x = vit.example(2, 8)
  out = jax.eval_shape(model.apply, jax.eval_shape(
      model.init, jax.random.key(0), x), x)
  assert out.shape == (2, 7)
  gpt = models.get_spec("gpt_small")
  lm = gpt.build(num_classes=256, block_size=16)
  assert (lm.n_layer, lm.n_head, lm.n_embd, lm.vocab_size) == (4, 4, 256, 256)
  t = gpt.example(2, 16)
  assert t.dtype == jnp.int32
  logits = jax.eval_shape(lm.apply, jax.eval_shape(
      lm.init, jax.random.key(0), t), t)
  assert logits.shape == (2, 16, 256)


def test_scanned_vit_has_stacked_blocks():
  model = models.ViT.tiny(depth=3, scan=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0), IMAGES)
  assert shapes["params"]["blocks"]["mlp"]["c_fc"]["kernel"].shape == (
      3, 192, 768)
  assert not any(k.startswith("blocks_") for k in shapes["params"])
