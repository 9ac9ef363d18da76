"""NNX GPT and ViT: Linen's paths, Linen's outputs and gradients, stats."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import lowrank_vjp.flax as lvf
import lowrank_vjp.models.nnx as mnnx
import lowrank_vjp.nnx as lvn
import lowrank_vjp.rules as lvr
from lowrank_vjp import models

GPT_KW = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
VIT_KW = dict(num_classes=5, width=24, depth=2, heads=3)
TOKENS = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
IMAGES = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
# name -> (Linen class, NNX class, NNX-only arguments, input)
MODELS = {"gpt": (models.GPT, mnnx.GPT, GPT_KW, {}, TOKENS),
          "vit": (models.ViT, mnnx.ViT, VIT_KW, {"image_size": 8}, IMAGES)}
VANILLA = dict(attention="jax", norm_method="flax", activation="jax")
LIBRARY = dict(attention="blockwise", activation="coded")  # 8-bit LN codes
CHOICES = {"vanilla": VANILLA, "library": LIBRARY}


def _random_params(linen, x, seed=0):
  """Random values for every Linen parameter (no init ones and zeros, so a
  tensor loaded into the wrong place shows)."""
  shapes = jax.eval_shape(linen.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
      shapes)


def _build(name, choice):
  """``(linen, nnx_model, params, x)``: the NNX model holds ``params``."""
  linen_cls, nnx_cls, kw, nnx_kw, x = MODELS[name]
  linen = linen_cls(**kw, **CHOICES[choice])
  params = _random_params(linen, x)
  model = nnx.eval_shape(lambda: nnx_cls(**kw, **nnx_kw, **CHOICES[choice],
                                         rngs=nnx.Rngs(0)))
  mnnx.load_linen_variables(model, {"params": params})
  return linen, model, params, x


def _flat(tree):
  return {"/".join(map(str, p)): v
          for p, v in traverse_util.flatten_dict(tree).items()}


def _nnx_params(model):
  return {"/".join(map(str, p)): v.get_value()
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@nnx.jit
def _nnx_call(model, x):
  return model(x)


def _linen_logits(linen, params, x):
  return jax.jit(lambda p, x: linen.apply({"params": p}, x,
                                          mutable=["compression"]))(params, x)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_params_are_the_linen_variables_tree(name):
  linen_cls, nnx_cls, kw, nnx_kw, x = MODELS[name]
  for choice in CHOICES.values():
    linen = linen_cls(**kw, **choice)
    want = jax.eval_shape(linen.init, jax.random.key(0), x)
    assert set(want) == {"params"}
    model = nnx.eval_shape(lambda c=choice: nnx_cls(**kw, **nnx_kw, **c,
                                                    rngs=nnx.Rngs(0)))
    got = {p: v.shape for p, v in _nnx_params(model).items()}
    assert got == {p: v.shape for p, v in _flat(want["params"]).items()}
    # Nothing but parameters and the LayerNorms' records.
    other = nnx.state(model, nnx.Not(nnx.Any(nnx.Param, lvn.Compression)))
    assert not nnx.to_flat_state(other)


@pytest.mark.parametrize("choice", sorted(CHOICES))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_equal_linen_with_its_variables(name, choice):
  linen, model, params, x = _build(name, choice)
  want, _ = _linen_logits(linen, params, x)
  got = _nnx_call(model, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Not trivially equal (ViT's init head is zero; the random one is not).
  assert float(jnp.max(jnp.abs(want))) > 0.1


def test_gradients_equal_linen():
  linen, model, params, x = _build("gpt", "library")

  def linen_loss(p):
    logits, _ = linen.apply({"params": p}, x, mutable=["compression"])
    return jnp.sum(jnp.sin(logits))

  @nnx.jit
  def nnx_grads(model):
    return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))),
                    argnums=nnx.DiffState(0, nnx.Param))(model)

  want = _flat(jax.jit(jax.grad(linen_loss))(params))
  got = {"/".join(map(str, p)): v.get_value()
         for p, v in nnx.to_flat_state(nnx_grads(model))}
  assert set(got) == set(want)
  for path, g in want.items():
    np.testing.assert_allclose(got[path], g, rtol=1e-4,
                               atol=1e-5 * float(jnp.max(jnp.abs(g))),
                               err_msg=path)


def test_stats_report_the_layer_norms_as_linen_sows_them():
  linen, model, params, x = _build("gpt", "library")
  assert lvn.stats(model) == {}          # nothing before the first call
  _nnx_call(model, x)
  got = lvn.stats(model)
  assert sorted(got) == ["h_0/ln_1", "h_0/ln_2", "h_1/ln_1", "h_1/ln_2",
                         "ln_f"]
  _, sown = _linen_logits(linen, params, x)
  want = lvf.collect_stats(sown)
  assert sorted(want) == sorted(got)
  for path, s in want.items():
    assert got[path].shape == s.shape == (2, 8, 16)
    assert got[path].residual_nbytes == s.residual_nbytes
    np.testing.assert_array_equal(got[path].kept_ranks, s.kept_ranks)


def test_dense_layers_are_the_rules_nnx_linear():
  model = nnx.eval_shape(lambda: mnnx.ViT(**VIT_KW, image_size=8,
                                          rngs=nnx.Rngs(0)))
  dense = {layer.path for layer in lvn.discover(model)
           if layer.kind == "dense"}
  assert dense == {f"blocks_{i}/{m}" for i in range(2)
                   for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc",
                             "mlp/c_proj")} | {"head"}
  plan = lvn.apply(model, [lvr.Rule(r".*/(c_attn|c_fc|c_proj)", "hosvd"),
                           lvr.Rule(".*")])
  assert len(plan.compressed) == 8
  lvn.restore(model)


def test_vit_widths_and_defaults_are_linen_s():
  for name, width, heads in (("tiny", 192, 3), ("small", 384, 6)):
    linen = getattr(models.ViT, name)(depth=1)
    model = nnx.eval_shape(lambda n=name: getattr(mnnx.ViT, n)(
        depth=1, rngs=nnx.Rngs(0)))
    assert (linen.width, linen.heads) == (model.width, model.heads) == (
        width, heads)
    assert model.num_classes == linen.num_classes
    assert model.patch_size == linen.patch_size
    assert model.mlp_ratio == linen.mlp_ratio
  linen = models.GPT()
  model = nnx.eval_shape(lambda: mnnx.GPT(rngs=nnx.Rngs(0)))
  for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
    assert getattr(model, field) == getattr(linen, field), field
  assert model.ln_f.method == linen.norm_method
  assert model.h_0.attn.choices == linen.choices(causal=True)


@pytest.mark.parametrize("field, value, match", [
    ("remat", "full", "remat must be None"),
    ("scan", True, "scan must be False"),
    ("attention", "flash", "attention must be"),
    ("activation", "relu", "activation must be"),
])
def test_unsupported_fields_are_named(field, value, match):
  for cls, kw, nnx_kw in ((mnnx.GPT, GPT_KW, {}),
                          (mnnx.ViT, VIT_KW, {"image_size": 8})):
    with pytest.raises(ValueError, match=match):
      cls(**kw, **nnx_kw, **{field: value}, rngs=nnx.Rngs(0))


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="multiple of n_head"):
    mnnx.GPT(**{**GPT_KW, "n_head": 3}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="multiples of patch_size"):
    mnnx.ViT(**VIT_KW, image_size=10, rngs=nnx.Rngs(0))
  gpt = nnx.eval_shape(lambda: mnnx.GPT(**GPT_KW, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="longer than block_size"):
    gpt(jnp.zeros((1, 9), int))
  vit = nnx.eval_shape(lambda: mnnx.ViT(**VIT_KW, image_size=8,
                                        rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="built for image_size"):
    vit(jnp.zeros((1, 16, 16, 3)))
