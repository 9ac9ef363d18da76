"""lowrank_vjp.training.cached_features: running a model from a block's
input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_vjp import models
from lowrank_vjp.training import cached_features as cf


@pytest.mark.parametrize("path,block", [
    ("features/17/conv/0/0", "features/17"),
    ("layer4/0/conv1", "layer4/0"),
    ("blocks/13/mobile_inverted_conv/depth_conv/conv", "blocks/13"),
    ("conv1", None),
    ("classifier/1", None),
])
def test_block_of(path, block):
  assert cf.block_of(path) == block


def test_cut_block_is_the_earliest_trained_block():
  assert cf.cut_block(["layer4/0/conv1", "layer4/1/conv2", "fc"]) == (
      "layer4/0")
  assert cf.cut_block(["fc"]) is None            # only the head: no block
  assert cf.cut_block(["conv1", "layer1/0/conv1"]) is None  # stem trained


@pytest.fixture(scope="module")
def resnet():
  model = models.ResNet18(num_classes=5)
  variables = models.init(model, 32, seed=0)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  return model, variables, x


def _block_inputs(model, variables, x, block):
  # Jitted, as are the applies below (op by op, every operation of the
  # ResNet compiled on its own: seconds a test).
  return jax.jit(lambda v, x: cf.block_inputs(model, v, x, block,
                                              train=False))(variables, x)


def test_from_block_equals_the_whole_model(resnet):
  model, variables, x = resnet
  block = "layer4/0"
  feats = _block_inputs(model, variables, x, block)
  assert feats.shape == (2, 2, 2, 256)
  tail = cf.FromBlock(model, block, x.shape)
  want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  got = jax.jit(lambda v, f: tail.apply(v, f, train=False))(variables, feats)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_from_block_gradient_equals_the_whole_model(resnet):
  model, variables, x = resnet
  block = "layer4/1"
  feats = _block_inputs(model, variables, x, block)
  tail = cf.FromBlock(model, block, x.shape)

  def loss(params, apply, inputs):
    v = {**variables, "params": params}
    return jnp.sum(jnp.square(apply(v, inputs, train=False)))

  grad = jax.jit(jax.grad(loss), static_argnums=1)  # op by op: seconds
  want = grad(variables["params"], model.apply, x)
  got = grad(variables["params"], tail.apply, feats)
  for a, b in ((got["layer4"]["1"], want["layer4"]["1"]),
               (got["fc"], want["fc"])):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5), a, b)
  # Layers before the cut get no gradient: their output was replaced.
  assert all(float(jnp.max(jnp.abs(g))) == 0.0
             for g in jax.tree.leaves(got["layer4"]["0"]))


def test_the_prefix_is_not_compiled(resnet):
  """The jitted tail has no convolution before the cut."""
  model, variables, x = resnet
  block = "layer4/1"
  feats = _block_inputs(model, variables, x, block)
  tail = cf.FromBlock(model, block, x.shape)
  hlo = jax.jit(lambda v, f: tail.apply(v, f, train=False)).lower(
      variables, feats).compile().as_text()
  whole = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      variables, x).compile().as_text()
  n_tail, n_whole = hlo.count("convolution("), whole.count("convolution(")
  assert 0 < n_tail <= 2 < n_whole     # layer4/1's two 3x3 convolutions


def test_block_inputs_rejects_an_unknown_block(resnet):
  model, variables, x = resnet
  with pytest.raises(ValueError, match="called 0 times"):
    _block_inputs(model, variables, x, "layer9/0")
