"""The small CNNs of the TDLRT experiments.

:class:`Net`, for scikit-learn's 8×8 digits (``experiments/tdlrt.py`` and
``experiments/tdlrt_study.py``), and :class:`SmallVGG`, for Fashion-MNIST's
28×28 images (``experiments/tdlrt_study.py --task fashion_mnist``).

``conv(32) → conv(64) → avg-pool 2 → conv(64) → mean → dense(classes)``,
each conv followed by :func:`lowrank_vjp.relu`; conv2 and conv3
(:data:`FACTORIZED`) are the layers whose kernels the experiment factorizes
and whose inputs it may save compressed. The parameters may hold
:class:`lowrank_vjp.tdlrt.TuckerWeight` kernels: the loss and accuracy
materialize them.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf
from lowrank_vjp import tdlrt as lt
from lowrank_vjp.training import methods

FACTORIZED = ("conv2", "conv3")
"""The layers whose kernels are factorized."""

BYTES = 4
"""Bytes per float32 element."""


class Net(nn.Module):
  """conv(32) → conv(64) → avg-pool 2 → conv(64) → mean → dense(classes).

  Attributes:
    classes: Outputs of the head.
    conv_cls: ``conv_general_dilated_cls`` of conv2 and conv3 (e.g.
      :func:`lowrank_vjp.flax.conv_cls`), or None for Flax's own.

  Example:
    >>> params = Net().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  """

  classes: int = 10
  conv_cls: object = None

  @nn.compact
  def __call__(self, x):
    kw = {} if self.conv_cls is None else {
        "conv_general_dilated_cls": self.conv_cls}
    x = lv.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = lv.relu(nn.Conv(64, (3, 3), name="conv2", **kw)(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = lv.relu(nn.Conv(64, (3, 3), name="conv3", **kw)(x))
    return nn.Dense(self.classes, name="head")(x.mean((1, 2)))


class SmallVGG(nn.Module):
  """conv(32) → max-pool 2 → conv(64) → conv(64) → avg-pool 2 → conv(128) →
  mean → dense(classes), each conv followed by :func:`lowrank_vjp.relu`;
  :data:`VGG_FACTORIZED` are conv2, conv3 and conv4 (129k of its 131k
  parameters).

  Example:
    >>> params = SmallVGG().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  """

  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = lv.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = lv.relu(nn.Conv(64, (3, 3), name="conv2")(x))
    x = lv.relu(nn.Conv(64, (3, 3), name="conv3")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = lv.relu(nn.Conv(128, (3, 3), name="conv4")(x))
    return nn.Dense(self.classes, name="head")(x.mean((1, 2)))


VGG_FACTORIZED = ("conv2", "conv3", "conv4")
"""The layers of :class:`SmallVGG` whose kernels are factorized."""


def make_loss(model: nn.Module):
  """``loss_fn(params, (x, y)) -> float32[]``: mean cross-entropy.

  ``params`` may hold factorized kernels (materialized first).
  """
  def loss_fn(params, batch):
    x, y = batch
    logits = model.apply({"params": lt.materialize(params)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss_fn


def accuracy(params, data, classes: int = 10, model: nn.Module | None = None,
             batch: int = 1000) -> float:
  """Top-1 accuracy of ``model`` (:class:`Net` when None) with ``params`` on
  ``data = (x, y)``, ``batch`` examples at a time."""
  x, y = data
  fn = _eval_fn(Net(classes) if model is None else model)
  params = lt.materialize(params)
  pred = np.concatenate([np.asarray(fn(params, jnp.asarray(x[i:i + batch])))
                         for i in range(0, len(x), batch)])
  return float(np.mean(pred == y))


@functools.cache
def _eval_fn(model):
  return jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1))


def activation_bytes(params, batch, hosvd_eps: float | None) -> int:
  """Bytes saved for the backward pass of conv2 and conv3 (their inputs).

  Args:
    params: The parameters.
    batch: ``(x, y)`` with ``x`` of shape ``[N, 8, 8, 1]``.
    hosvd_eps: None for the full float32 inputs; else ε of HOSVD residuals,
      whose static bytes the layers report.

  Returns:
    The bytes, summed over the two layers.
  """
  x = batch[0]
  if hosvd_eps is None:
    n = x.shape[0]
    return n * (8 * 8 * 32 + 4 * 4 * 64) * BYTES
  model = Net(conv_cls=lvf.conv_cls(
      **methods.method_settings("hosvd", eps=hosvd_eps)))
  _, state = jax.jit(lambda p, x: model.apply(
      {"params": lt.materialize(p)}, x, mutable=["compression"]))(params, x)
  stats = lvf.collect_stats(state)
  return int(sum(s.residual_nbytes for s in stats.values()))
