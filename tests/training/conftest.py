"""A tiny Linen classifier for the training-library tests."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
import lowrank_vjp.rules as lvr


class TinyNet(nn.Module):
  """conv → BN → relu → conv → relu → mean → dropout → dense (8 classes)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
    x = lv.relu(x)
    x = lv.relu(nn.Conv(8, (3, 3), name="conv2")(x))
    x = nn.Dropout(0.1, deterministic=not train)(x.mean((1, 2)))
    return nn.Dense(8, name="head")(x)


@dataclasses.dataclass
class Tiny:
  model: TinyNet
  variables: dict
  layers: tuple
  x: jax.Array        # float32[4, 6, 6, 3]
  labels: jax.Array   # int32[4]

  def plan(self, settings, k=1):
    return lvr.make_plan(self.layers, lvr.fine_tune_last(
        self.layers, k, settings, head="head"))


@pytest.fixture(scope="session")
def tiny():
  model = TinyNet()
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  layers = lvr.discover(model, jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        variables=variables, train=True)
  labels = jnp.asarray(np.arange(4) % 8, jnp.int32)
  return Tiny(model, variables, tuple(layers), x, labels)
