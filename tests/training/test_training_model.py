"""The model of a train.py job: inputs, neighbour layers per run, rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import lowrank_vjp.rules as lvr
from lowrank_vjp import models, training
from lowrank_vjp.training import model as model_lib

GPT = training.TrainConfig.from_flags({"model": "gpt_small", "seq_len": 8})
VIT = training.TrainConfig.from_flags({"model": "vit_tiny", "image_size": 8,
                                       "model_kwargs": '{"depth": 4}'})


def test_input_spec_by_model():
  assert model_lib.input_spec(GPT, 3) == jax.ShapeDtypeStruct((3, 8),
                                                              jnp.int32)
  assert model_lib.input_spec(VIT, 2) == jax.ShapeDtypeStruct(
      (2, 8, 8, 3), jnp.float32)
  cnn = training.TrainConfig(image_size=32)
  assert model_lib.input_spec(cnn, 1).shape == (1, 32, 32, 3)


@pytest.mark.parametrize("method,want", [
    ("vanilla", {"attention": "jax", "norm_method": "flax",
                 "activation": "jax"}),
    ("checkpoint", {"attention": "jax", "norm_method": "flax",
                    "activation": "jax", "remat": "full"}),
    ("hosvd", {}),
    ("quant", {}),
])
def test_transformer_neighbours_per_run(method, want):
  assert model_lib.neighbours(models.get_spec("gpt_small"), method) == want
  # CNNs have no neighbour fields.
  assert model_lib.neighbours(models.get_spec("resnet18"), method) == {}


def test_build_model_gives_each_run_its_layers():
  vanilla, variables, _, path = training.build_model(GPT, 256,
                                                     method="vanilla")
  lean, _, _, _ = training.build_model(GPT, 256, method="hosvd")
  assert path is None and vanilla.attention == "jax"
  assert lean.attention == "blockwise" and vanilla.block_size == 8
  assert variables["params"]["wpe"]["embedding"].shape == (8, 256)


def _layers(config):
  model, variables, spec, _ = training.build_model(config, 10)
  return lvr.discover(model, model_lib.input_spec(config, 2),
                      variables=variables, train=True), spec


def test_transformer_rules_all_trains_everything():
  layers, spec = _layers(GPT)
  plan = lvr.make_plan(layers, training.make_rules(GPT, layers, spec,
                                                   {"method": "quant"}))
  assert len(plan.compressed) == 16
  assert {"wte", "wpe", "ln_f", "h_0/ln_1"} <= set(plan.trainable)


def test_transformer_rules_last_k_blocks():
  config = VIT.replace(layers="3")
  layers, spec = _layers(config)
  plan = lvr.make_plan(layers, training.make_rules(config, layers, spec,
                                                   {"method": "quant"}))
  assert [p for p, _ in plan.compressed][0] == "blocks_1/attn/c_attn"
  assert len(plan.compressed) == 12
  trained = set(plan.trainable)
  assert {"blocks_1/ln_1", "ln_f", "head"} <= trained
  assert not trained & {"", "patch_embed", "blocks_0/ln_1"}


def test_transformer_rules_regex_and_errors():
  config = GPT.replace(layers=r"h_3/mlp/c_fc")
  layers, spec = _layers(config)
  plan = lvr.make_plan(layers, training.make_rules(config, layers, spec,
                                                   {"method": "quant"}))
  assert [p for p, _ in plan.compressed] == ["h_3/mlp/c_fc"]
  with pytest.raises(ValueError, match="has 4 blocks; give 1..4 or 'all'"):
    training.make_rules(GPT.replace(layers="5"), layers, spec, {})


def test_vit_class_token_and_positions_train_with_everything():
  layers, spec = _layers(VIT)
  plan = lvr.make_plan(layers, training.make_rules(VIT, layers, spec, {}))
  trained, _ = plan.split(training.build_model(VIT, 10)[1])
  assert {"cls_token", "pos_embed", "patch_embed"} <= set(trained["params"])


def test_scanned_transformer_trains_whole():
  config = GPT.replace(scan=True)
  layers, spec = _layers(config)
  plan = lvr.make_plan(layers, training.make_rules(config, layers, spec,
                                                   {"method": "quant"}))
  assert [p for p, _ in plan.compressed] == [
      "h/attn/c_attn", "h/attn/c_proj", "h/mlp/c_fc", "h/mlp/c_proj"]
  assert {"wte", "h/ln_1", "ln_f"} <= set(plan.trainable)
  with pytest.raises(ValueError, match="scanned gpt_small share stacked"):
    training.make_rules(config.replace(layers="2"), layers, spec, {})
  with pytest.raises(ValueError, match="no transformer blocks to scan"):
    training.build_model(training.TrainConfig(scan=True, weights="none"), 10)


def test_cnn_rules_all_trains_every_conv():
  """'all' on a CNN: every conv, downsampling ones included, compressed
  (peak_memory's k = "all"); '4' keeps the papers' count."""
  config = training.TrainConfig(model="mobilenet_v2", weights="none",
                                image_size=32, layers="all")
  model, variables, spec, _ = training.build_model(config, 10)
  layers = lvr.discover(model, model_lib.input_spec(config, 2),
                        variables=variables, train=True)
  convs = {layer.path for layer in layers if layer.kind == "conv"}
  plan = lvr.make_plan(layers, training.make_rules(
      config, layers, spec, {"method": "hosvd", "eps": 0.9}))
  assert set(dict(plan.compressed)) == convs and len(convs) == 52
  last4 = lvr.make_plan(layers, training.make_rules(
      config.replace(layers="4"), layers, spec, {"method": "hosvd"}))
  assert len(last4.compressed) == 4
