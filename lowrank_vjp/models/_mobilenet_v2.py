"""MobileNetV2 in torchvision's layout (Sandler et al., 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from lowrank_vjp._src.layers.activations import relu6
from lowrank_vjp.models import _layers

# (expand ratio t, output channels c, repeats n, first stride s), as in the
# paper's Table 2 and torchvision.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2),
                             (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                             (6, 320, 1, 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class ConvBNReLU6(nn.Module):
  """torchvision's ``Conv2dNormActivation``: conv ``"0"``, BN ``"1"``, ReLU6.

  The ReLU6 is :func:`lowrank_vjp.relu6` (1-bit residual);
  ``jax.nn.relu6`` would keep its full-size input for the backward pass.
  """

  features: int
  kernel: int = 3
  stride: int = 1
  groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = _layers.conv(self.features, self.kernel, self.stride, self.groups,
                     name="0")(x)
    x = _layers.batch_norm(name="1")(x, use_running_average=not train)
    return relu6(x)


class InvertedResidual(nn.Module):
  """torchvision's ``InvertedResidual``; its layers live under ``conv``."""

  in_channels: int
  out_channels: int
  stride: int
  expand_ratio: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    hidden = int(round(self.in_channels * self.expand_ratio))
    seq = _Conv(self.out_channels, hidden, self.stride,
                self.expand_ratio != 1, name="conv")
    y = seq(x, train)
    if self.stride == 1 and self.in_channels == self.out_channels:
      return x + y
    return y


class _Conv(nn.Module):
  """The ``conv`` Sequential of an inverted residual block."""

  out_channels: int
  hidden: int
  stride: int
  expand: bool

  @nn.compact
  def __call__(self, x, train=False):
    i = 0
    if self.expand:
      x = ConvBNReLU6(self.hidden, kernel=1, name=str(i))(x, train)
      i += 1
    x = ConvBNReLU6(self.hidden, 3, self.stride, groups=self.hidden,
                    name=str(i))(x, train)
    x = _layers.conv(self.out_channels, 1, name=str(i + 1))(x)
    return _layers.batch_norm(name=str(i + 2))(
        x, use_running_average=not train)


class _Features(nn.Module):
  width_mult: float
  taps: tuple[int, ...]

  @nn.compact
  def __call__(self, x, train=False):
    taps = {}
    channels = _make_divisible(32 * self.width_mult)
    last = _make_divisible(1280 * max(1.0, self.width_mult))
    x = ConvBNReLU6(channels, 3, 2, name="0")(x, train)
    if 0 in self.taps:
      taps[0] = x
    index = 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
      out = _make_divisible(c * self.width_mult)
      for i in range(n):
        x = InvertedResidual(channels, out, s if i == 0 else 1, t,
                             name=str(index))(x, train)
        channels = out
        if index in self.taps:
          taps[index] = x
        index += 1
    x = ConvBNReLU6(last, kernel=1, name=str(index))(x, train)
    if index in self.taps:
      taps[index] = x
    return x, taps


class MobileNetV2(nn.Module):
  """MobileNetV2 with torchvision's module names and ImageNet weights layout.

  Module paths follow torchvision with ``/`` for ``.``: ``features/0/0`` is
  the stem convolution, ``features/17/conv/{0/0, 1/0, 2}`` the expansion,
  depthwise and projection convolutions of block 17, ``features/18/0`` the
  last 1×1 convolution, ``classifier/1`` the linear head. Input is NHWC,
  normalised with the ImageNet mean and std (see
  :func:`lowrank_vjp.models.preprocess`). Every ReLU6 is
  :func:`lowrank_vjp.relu6`.

  Attributes:
    num_classes: Classes of the linear head; ``None`` drops the head (and
      the pooling) and returns the last feature map ``[N, H/32, W/32, 1280]``.
    width_mult: Channel multiplier (1.0 for the ImageNet weights).
    dropout_rate: Dropout before the head (active when ``train=True``; needs
      a ``"dropout"`` rng).
    taps: Indices of ``features`` whose outputs are also returned, as
      ``(out, {index: feature_map})`` (e.g. ``(3, 6, 13)`` for strides 4,
      8 and 16: a segmentation encoder).

  Example::

    model = lowrank_vjp.models.MobileNetV2(num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = model.apply(variables, x)            # [N, 10]
  """

  num_classes: int | None = 1000
  width_mult: float = 1.0
  dropout_rate: float = 0.2
  taps: Sequence[int] = ()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    """Runs the network.

    Args:
      x: Images ``[N, H, W, 3]``, ImageNet-normalised.
      train: Batch statistics in BatchNorm and active dropout.

    Returns:
      Logits ``[N, num_classes]`` (or the last feature map if
      ``num_classes`` is None); with ``taps``, ``(that, {index: map})``.
    """
    x, taps = _Features(self.width_mult, tuple(self.taps), name="features")(
        x, train)
    if self.num_classes is not None:
      x = _layers.global_avg_pool(x)
      x = _Classifier(self.num_classes, self.dropout_rate,
                      name="classifier")(x, train)
    return (x, taps) if self.taps else x


class _Classifier(nn.Module):
  """torchvision's ``classifier``: Dropout ``"0"``, Linear ``"1"``."""

  num_classes: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dropout(self.dropout_rate, deterministic=not train, name="0")(x)
    return nn.Dense(self.num_classes, kernel_init=_layers.head_init,
                    name="1")(x)
