"""MobileNetV2 in Flax NNX, with the module paths of the Linen one."""

from __future__ import annotations

import os

import jax
from flax import nnx

from lowrank_vjp._src.layers.activations import relu6
from lowrank_vjp.models import _layers
from lowrank_vjp.models import _nnx_common as common
from lowrank_vjp.models._mobilenet_v2 import (
  INVERTED_RESIDUAL_SETTING,
  _make_divisible,
)


class ConvBNReLU6(nnx.Module):
  """torchvision's ``Conv2dNormActivation``: conv ``"0"``, BN ``"1"``, ReLU6
  (:func:`lowrank_vjp.relu6`)."""

  def __init__(self, in_features: int, features: int, kernel: int = 3,
               stride: int = 1, groups: int = 1, *, rngs: nnx.Rngs):
    common.set_child(self, 0, common.conv(in_features, features, kernel,
                                          stride, groups, rngs=rngs))
    common.set_child(self, 1, common.batch_norm(features, rngs=rngs))

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = common.get_child(self, 0)(x)
    x = common.get_child(self, 1)(x, use_running_average=not train)
    return relu6(x)


class _Conv(nnx.Module):
  """The ``conv`` Sequential of an inverted residual block: (expansion
  ``"0"``), depthwise, projection conv, BN."""

  def __init__(self, in_channels: int, out_channels: int, hidden: int,
               stride: int, expand: bool, *, rngs: nnx.Rngs):
    i = 0
    if expand:
      common.set_child(self, i, ConvBNReLU6(in_channels, hidden, kernel=1,
                                            rngs=rngs))
      i += 1
    common.set_child(self, i, ConvBNReLU6(hidden, hidden, 3, stride,
                                          groups=hidden, rngs=rngs))
    common.set_child(self, i + 1, common.conv(hidden, out_channels, 1,
                                              rngs=rngs))
    common.set_child(self, i + 2, common.batch_norm(out_channels, rngs=rngs))
    self.blocks = i + 1  # the ConvBNReLU6 children

  def __call__(self, x, train=False):
    for i in range(self.blocks):
      x = common.get_child(self, i)(x, train)
    x = common.get_child(self, self.blocks)(x)
    return common.get_child(self, self.blocks + 1)(
        x, use_running_average=not train)


class InvertedResidual(nnx.Module):
  """torchvision's ``InvertedResidual``; its layers live under ``conv``."""

  def __init__(self, in_channels: int, out_channels: int, stride: int,
               expand_ratio: int, *, rngs: nnx.Rngs):
    hidden = int(round(in_channels * expand_ratio))
    self.conv = _Conv(in_channels, out_channels, hidden, stride,
                      expand_ratio != 1, rngs=rngs)
    self.residual = stride == 1 and in_channels == out_channels

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = self.conv(x, train)
    return x + y if self.residual else y


class _Features(nnx.Module):
  """``features``: the stem ``"0"``, 17 inverted residuals, the last 1×1
  conv ``"18"``."""

  def __init__(self, width_mult: float, *, rngs: nnx.Rngs):
    channels = _make_divisible(32 * width_mult)
    self.out_features = _make_divisible(1280 * max(1.0, width_mult))
    common.set_child(self, 0, ConvBNReLU6(3, channels, 3, 2, rngs=rngs))
    index = 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
      out = _make_divisible(c * width_mult)
      for i in range(n):
        common.set_child(self, index, InvertedResidual(
            channels, out, s if i == 0 else 1, t, rngs=rngs))
        channels = out
        index += 1
    common.set_child(self, index, ConvBNReLU6(channels, self.out_features,
                                              kernel=1, rngs=rngs))
    self.layers = index + 1

  def __call__(self, x, train=False):
    for i in range(self.layers):
      x = common.get_child(self, i)(x, train)
    return x


class _Classifier(nnx.Module):
  """torchvision's ``classifier``: Dropout ``"0"``, Linear ``"1"``."""

  def __init__(self, in_features: int, num_classes: int, dropout_rate: float,
               *, rngs: nnx.Rngs):
    common.set_child(self, 0, nnx.Dropout(dropout_rate, rngs=rngs))
    common.set_child(self, 1, common.head(in_features, num_classes,
                                          rngs=rngs))

  def __call__(self, x, train=False):
    x = common.get_child(self, 0)(x, deterministic=not train)
    return common.get_child(self, 1)(x)


class MobileNetV2(nnx.Module):
  """MobileNetV2 (NNX) with the Linen model's module paths.

  The same network as :class:`lowrank_vjp.models.MobileNetV2`, module for
  module: ``features/0/0`` is the stem convolution, ``features/0/1`` its
  BatchNorm, ``features/17/conv/{0/0, 1/0, 2}`` the expansion, depthwise and
  projection convolutions of block 17 (``features/17/conv/3`` its BN),
  ``features/18/0`` the last 1×1 convolution, ``classifier/0`` the dropout
  and ``classifier/1`` the linear head. Linen variables (and so
  torchvision's ImageNet weights) load with
  :func:`lowrank_vjp.models.nnx.load_linen_variables`. Input is NHWC with 3
  channels, ImageNet-normalised (:func:`lowrank_vjp.models.preprocess`).
  Every ReLU6 is :func:`lowrank_vjp.relu6`.

  Args:
    num_classes: Classes of the linear head; ``None`` drops the head (and
      the pooling) and returns the last feature map ``[N, H/32, W/32, 1280]``.
    width_mult: Channel multiplier (1.0 for the ImageNet weights).
    dropout_rate: Dropout before the head, active when ``train=True``; its
      keys come from the ``"dropout"`` stream of ``rngs`` (else
      ``"default"``), forked and held by the model.
    rngs: Initialisation (and dropout) keys.

  Example::

    model = lowrank_vjp.models.nnx.MobileNetV2(10, rngs=nnx.Rngs(0))
    logits = model(x)                 # [N, 10], running BN statistics
    logits = model(x, train=True)     # batch statistics, updated in place
  """

  def __init__(self, num_classes: int | None = 1000, width_mult: float = 1.0,
               dropout_rate: float = 0.2, *, rngs: nnx.Rngs):
    self.features = _Features(width_mult, rngs=rngs)
    if num_classes is not None:
      self.classifier = _Classifier(self.features.out_features, num_classes,
                                    dropout_rate, rngs=rngs)
    self.num_classes = num_classes

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Runs the network.

    Args:
      x: Images ``[N, H, W, 3]``, ImageNet-normalised.
      train: Batch statistics in BatchNorm (the running statistics are
        updated in place) and active dropout.

    Returns:
      Logits ``[N, num_classes]``, or the last feature map if
      ``num_classes`` is None.
    """
    x = self.features(x, train)
    if self.num_classes is None:
      return x
    return self.classifier(_layers.global_avg_pool(x), train)


def pretrained_mobilenet_v2(num_classes: int = 1000, *, rngs: nnx.Rngs,
                            weights: str | os.PathLike | None = None,
                            **model_kwargs) -> MobileNetV2:
  """An NNX MobileNetV2 with torchvision's ImageNet weights.

  The weights are the ones :func:`lowrank_vjp.models.pretrained` loads for
  ``"mobilenet_v2"`` (by default the offline file of
  :func:`lowrank_vjp.models.mobilenet_v2_weights`), converted by that Linen
  path and copied with :func:`lowrank_vjp.models.nnx.load_linen_variables`.

  Args:
    num_classes: Head size. Other than 1000, the head ``classifier/1`` keeps
      its initialisation from ``rngs`` and every other layer is loaded.
    rngs: Initialisation keys (the head's when it is not loaded) and the
      dropout stream.
    weights: A ``.pth`` file of torchvision's MobileNetV2; by default the
      offline one.
    **model_kwargs: More arguments of :class:`MobileNetV2`
      (``dropout_rate``).

  Returns:
    The model, every BatchNorm with torchvision's running statistics.

  Raises:
    FileNotFoundError: when no weights file is given or installed.
    WeightConversionError: when the file does not fit the model.

  Example::

    model = lowrank_vjp.models.nnx.pretrained_mobilenet_v2(rngs=nnx.Rngs(0))
    logits = model(lowrank_vjp.models.preprocess(images, 224))
  """
  return common.pretrained(MobileNetV2, "mobilenet_v2", num_classes,
                           rngs=rngs, weights=weights, **model_kwargs)
