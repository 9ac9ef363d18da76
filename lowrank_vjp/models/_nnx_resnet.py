"""ResNet-18/34 in Flax NNX, with the module paths of the Linen ones."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
from flax import nnx

from lowrank_vjp._src.layers.activations import relu
from lowrank_vjp._src.layers.pooling import max_pool
from lowrank_vjp.models import _layers
from lowrank_vjp.models import _nnx_common as common


class _Downsample(nnx.Module):
  """``downsample``: a 1×1 conv ``"0"`` and BN ``"1"``."""

  def __init__(self, in_features: int, features: int, stride: int, *,
               rngs: nnx.Rngs):
    common.set_child(self, 0, common.conv(in_features, features, 1, stride,
                                          rngs=rngs))
    common.set_child(self, 1, common.batch_norm(features, rngs=rngs))

  def __call__(self, x, train=False):
    x = common.get_child(self, 0)(x)
    return common.get_child(self, 1)(x, use_running_average=not train)


class BasicBlock(nnx.Module):
  """torchvision's ``BasicBlock``: ``conv1``/``bn1``, ``conv2``/``bn2`` and,
  when the shape changes, ``downsample`` (``"0"`` a 1×1 conv, ``"1"`` BN)."""

  def __init__(self, in_features: int, features: int, stride: int = 1, *,
               rngs: nnx.Rngs):
    self.conv1 = common.conv(in_features, features, 3, stride, rngs=rngs)
    self.bn1 = common.batch_norm(features, rngs=rngs)
    self.conv2 = common.conv(features, features, 3, rngs=rngs)
    self.bn2 = common.batch_norm(features, rngs=rngs)
    if stride != 1 or in_features != features:
      self.downsample = _Downsample(in_features, features, stride, rngs=rngs)
    else:
      self.downsample = None

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = relu(self.bn1(self.conv1(x), use_running_average=not train))
    y = self.bn2(self.conv2(y), use_running_average=not train)
    if self.downsample is not None:
      x = self.downsample(x, train)
    return relu(y + x)


class _Stage(nnx.Module):
  """``layer{i}``: blocks ``"0"``, ``"1"``, …"""

  def __init__(self, in_features: int, features: int, blocks: int,
               stride: int, *, rngs: nnx.Rngs):
    for i in range(blocks):
      common.set_child(self, i, BasicBlock(
          in_features if i == 0 else features, features,
          stride if i == 0 else 1, rngs=rngs))
    self.blocks = blocks

  def __call__(self, x, train=False):
    for i in range(self.blocks):
      x = common.get_child(self, i)(x, train)
    return x


class ResNet(nnx.Module):
  """A ResNet of basic blocks (NNX) with the Linen model's module paths.

  The same network as :class:`lowrank_vjp.models.ResNet`: ``conv1``,
  ``bn1``, ``layer{1..4}/{block}/{conv,bn}{1,2}``,
  ``layer{2..4}/0/downsample/{0,1}``, ``fc``. Linen variables load with
  :func:`lowrank_vjp.models.nnx.load_linen_variables`. ReLUs are
  :func:`lowrank_vjp.relu`, the max pool :func:`lowrank_vjp.max_pool`. Use
  :data:`ResNet18` / :data:`ResNet34`.

  Args:
    stage_sizes: Blocks per stage (``(2, 2, 2, 2)`` for ResNet-18).
    num_classes: Classes of the ``fc`` head; ``None`` returns the last
      feature map ``[N, H/32, W/32, 512]``.
    rngs: Initialisation keys.

  Example::

    model = lowrank_vjp.models.nnx.ResNet18(num_classes=10, rngs=nnx.Rngs(0))
    logits = model(x)                 # [N, 10]
  """

  def __init__(self, stage_sizes: Sequence[int],
               num_classes: int | None = 1000, *, rngs: nnx.Rngs):
    self.conv1 = common.conv(3, 64, 7, 2, rngs=rngs)
    self.bn1 = common.batch_norm(64, rngs=rngs)
    features = 64
    for i, blocks in enumerate(stage_sizes):
      out = 64 * 2**i
      common.set_child(self, f"layer{i + 1}", _Stage(
          features, out, blocks, 1 if i == 0 else 2, rngs=rngs))
      features = out
    self.stages = len(stage_sizes)
    if num_classes is not None:
      self.fc = common.head(features, num_classes, rngs=rngs)
    self.num_classes = num_classes

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Images ``[N, H, W, 3]`` (ImageNet-normalised) to logits.

    With ``train=True`` BatchNorm uses batch statistics and updates its
    running statistics in place.
    """
    x = relu(self.bn1(self.conv1(x), use_running_average=not train))
    x = max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i in range(self.stages):
      x = common.get_child(self, f"layer{i + 1}")(x, train)
    if self.num_classes is None:
      return x
    return self.fc(_layers.global_avg_pool(x))


ResNet18 = functools.partial(ResNet, (2, 2, 2, 2))
"""ResNet-18: ``ResNet18(num_classes=..., rngs=...)``."""

ResNet34 = functools.partial(ResNet, (3, 4, 6, 3))
"""ResNet-34: ``ResNet34(num_classes=..., rngs=...)``."""
