"""The TDLRT experiments' small CNNs and their accuracy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_vjp import tdlrt as lt
from lowrank_vjp.training import digits_net as dn


def test_small_vgg_shapes_and_factorized_layers():
  model = dn.SmallVGG()
  x = jax.random.normal(jax.random.key(0), (5, 28, 28, 1))
  params = jax.jit(model.init)(jax.random.key(1), x[:1])["params"]
  assert model.apply({"params": params}, x).shape == (5, 10)
  shapes = {n: params[n]["kernel"].shape for n in dn.VGG_FACTORIZED}
  assert shapes == {"conv2": (3, 3, 32, 64), "conv3": (3, 3, 64, 64),
                    "conv4": (3, 3, 64, 128)}


def test_accuracy_in_batches_with_tucker_kernels():
  model = dn.SmallVGG(classes=3)
  x = jax.random.normal(jax.random.key(2), (7, 28, 28, 1))
  params = jax.jit(model.init)(jax.random.key(3), x[:1])["params"]
  params = dict(params)
  params["conv3"] = {**params["conv3"], "kernel": jax.jit(
      lambda k: lt.tucker_from_kernel(k, (3, 3, 8, 8)))(
          params["conv3"]["kernel"])}
  pred = np.asarray(jnp.argmax(model.apply(
      {"params": lt.materialize(params)}, x), -1))
  y = pred.copy()
  y[:3] = (y[:3] + 1) % 3                     # three wrong of seven
  acc = dn.accuracy(params, (np.asarray(x), y), model=model, batch=2)
  assert acc == 4 / 7
