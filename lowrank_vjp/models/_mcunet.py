"""MCUNet (Lin et al., 2020), the ``mcunet-in1`` / ``mcunet-5fps`` network.

This is the variant that the gradient-filter paper (Yang et al., CVPR 2023,
``build_model("mcunet-5fps")``) and the HOSVD paper (Nguyen et al., NeurIPS
2024, ``build_model("mcunet-in1")``, the same network under its newer name)
fine-tune. Its architecture (MCUNet's published
``mcunet-5fps_imagenet.json``, a ProxylessNAS network) is written out below
as data; module names follow MCUNet's PyTorch ``ProxylessNASNets`` so that
its state dict converts key by key. No ImageNet weights for it install
offline: pass MCUNet's ``.pth`` to :func:`lowrank_vjp.models.from_torch`
when you have it.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from lowrank_vjp._src.layers.activations import relu6
from lowrank_vjp.models import _layers

# (in, out, kernel, stride, expand_ratio, mid_channels, identity shortcut)
MCUNET_5FPS_BLOCKS = (
    (16, 8, 3, 1, 1, 16, False),
    (8, 16, 3, 2, 4, 32, False),
    (16, 16, 3, 1, 3, 48, True),
    (16, 24, 7, 2, 3, 48, False),
    (24, 24, 3, 1, 5, 120, True),
    (24, 40, 3, 2, 5, 120, False),
    (40, 40, 7, 1, 4, 160, True),
    (40, 48, 5, 1, 4, 160, False),
    (48, 48, 3, 1, 3, 144, True),
    (48, 48, 3, 1, 4, 192, True),
    (48, 96, 7, 2, 5, 240, False),
    (96, 96, 5, 1, 4, 384, True),
    (96, 96, 5, 1, 4, 384, True),
    (96, 160, 3, 1, 6, 576, False),
)
MCUNET_5FPS_STEM = 16
MCUNET_5FPS_RESOLUTION = 96  # the resolution MCUNet was trained at


class ConvLayer(nn.Module):
  """ProxylessNAS ``ConvLayer`` (weight, BN, act): ``conv``, ``bn``, ReLU6."""

  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  act: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    x = _layers.conv(self.features, self.kernel, self.stride, self.groups,
                     name="conv")(x)
    x = _layers.batch_norm(name="bn")(x, use_running_average=not train)
    return relu6(x) if self.act else x


class MBInvertedConvLayer(nn.Module):
  """``inverted_bottleneck`` (absent when expand_ratio is 1), ``depth_conv``
  and ``point_linear``, each a :class:`ConvLayer`."""

  out_channels: int
  kernel: int
  stride: int
  expand_ratio: int
  mid_channels: int

  @nn.compact
  def __call__(self, x, train=False):
    if self.expand_ratio != 1:
      x = ConvLayer(self.mid_channels, name="inverted_bottleneck")(x, train)
    x = ConvLayer(self.mid_channels, self.kernel, self.stride,
                  groups=self.mid_channels, name="depth_conv")(x, train)
    return ConvLayer(self.out_channels, act=False, name="point_linear")(
        x, train)


class _Block(nn.Module):
  spec: tuple

  @nn.compact
  def __call__(self, x, train=False):
    _, out, k, s, t, mid, shortcut = self.spec
    y = MBInvertedConvLayer(out, k, s, t, mid, name="mobile_inverted_conv")(
        x, train)
    return x + y if shortcut else y


class _Blocks(nn.Module):
  blocks: tuple

  @nn.compact
  def __call__(self, x, train=False):
    for i, spec in enumerate(self.blocks):
      x = _Block(spec, name=str(i))(x, train)
    return x


class MCUNet(nn.Module):
  """MCUNet-5fps (``mcunet-in1``) with MCUNet's PyTorch module names.

  Module paths: ``first_conv/conv``, ``blocks/{i}/mobile_inverted_conv/
  {inverted_bottleneck, depth_conv, point_linear}/conv`` (BN under ``bn``),
  ``classifier/linear``. The last four convolutions (the set the papers
  fine-tune as "last 4") are block 13's three and block 12's
  ``point_linear``. ReLU6 is :func:`lowrank_vjp.relu6`.

  Attributes:
    num_classes: Classes of the linear head; ``None`` returns the last
      feature map ``[N, H/32, W/32, 160]``.
    blocks: Block table ``(in, out, kernel, stride, expand, mid, shortcut)``.
    stem: Channels of ``first_conv``.
  """

  num_classes: int | None = 1000
  blocks: Sequence[tuple] = MCUNET_5FPS_BLOCKS
  stem: int = MCUNET_5FPS_STEM

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Images ``[N, H, W, 3]`` (ImageNet-normalised) to logits."""
    x = ConvLayer(self.stem, 3, 2, name="first_conv")(x, train)
    x = _Blocks(tuple(self.blocks), name="blocks")(x, train)
    if self.num_classes is None:
      return x
    x = _layers.global_avg_pool(x)
    return _Linear(self.num_classes, name="classifier")(x)


class _Linear(nn.Module):
  """ProxylessNAS ``LinearLayer``: a ``linear`` Dense (dropout rate 0)."""

  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes, kernel_init=_layers.head_init,
                    name="linear")(x)
