"""ResNet-18/34 in torchvision's layout (He et al., 2016)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from lowrank_vjp._src.layers.activations import relu
from lowrank_vjp._src.layers.pooling import max_pool
from lowrank_vjp.models import _layers


class BasicBlock(nn.Module):
  """torchvision's ``BasicBlock``: ``conv1``/``bn1``, ``conv2``/``bn2`` and,
  when the shape changes, ``downsample`` (``"0"`` a 1×1 conv, ``"1"`` BN)."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = lambda name: functools.partial(
        _layers.batch_norm(name=name), use_running_average=not train)
    y = _layers.conv(self.features, 3, self.stride, name="conv1")(x)
    y = relu(bn("bn1")(y))
    y = _layers.conv(self.features, 3, name="conv2")(y)
    y = bn("bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _Downsample(self.features, self.stride, name="downsample")(x, train)
    return relu(y + x)


class _Downsample(nn.Module):
  features: int
  stride: int

  @nn.compact
  def __call__(self, x, train=False):
    x = _layers.conv(self.features, 1, self.stride, name="0")(x)
    return _layers.batch_norm(name="1")(x, use_running_average=not train)


class _Stage(nn.Module):
  features: int
  blocks: int
  stride: int

  @nn.compact
  def __call__(self, x, train=False):
    for i in range(self.blocks):
      x = BasicBlock(self.features, self.stride if i == 0 else 1,
                     name=str(i))(x, train)
    return x


class ResNet(nn.Module):
  """A ResNet of basic blocks with torchvision's module names.

  Module paths: ``conv1``, ``bn1``, ``layer{1..4}/{block}/conv{1,2}``,
  ``layer{2..4}/0/downsample/{0,1}``, ``fc``. ReLUs are
  :func:`lowrank_vjp.relu` (1-bit residual). Use :data:`ResNet18` /
  :data:`ResNet34`.

  Attributes:
    stage_sizes: Blocks per stage (``(2, 2, 2, 2)`` for ResNet-18).
    num_classes: Classes of the ``fc`` head; ``None`` returns the last
      feature map ``[N, H/32, W/32, 512]``.
  """

  stage_sizes: Sequence[int]
  num_classes: int | None = 1000

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Images ``[N, H, W, 3]`` (ImageNet-normalised) to logits."""
    x = _layers.conv(64, 7, 2, name="conv1")(x)
    x = relu(_layers.batch_norm(name="bn1")(x, use_running_average=not train))
    x = max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate(self.stage_sizes):
      x = _Stage(64 * 2**i, blocks, 1 if i == 0 else 2,
                 name=f"layer{i + 1}")(x, train)
    if self.num_classes is None:
      return x
    x = _layers.global_avg_pool(x)
    return nn.Dense(self.num_classes, kernel_init=_layers.head_init,
                    name="fc")(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
"""ResNet-18: ``ResNet18(num_classes=...)``."""

ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
"""ResNet-34: ``ResNet34(num_classes=...)``."""
