"""Torch-compatible building blocks shared by the model definitions.

Every layer is a plain ``nn.Conv`` / ``nn.BatchNorm`` / ``nn.Dense`` named as
in the torchvision module it mirrors (``"0"``, ``"1"``, ``"conv1"``, …), so
a module path such as ``features/17/conv/1/0`` is torchvision's
``features.17.conv.1.0`` with ``/`` for ``.``, and weights convert key by key.
Nothing here is compressed: compression is applied from outside by
:mod:`lowrank_vjp.rules`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
head_init = nn.initializers.normal(0.01)


def conv(features: int, kernel: int, stride: int = 1, groups: int = 1,
         name: str | None = None, use_bias: bool = False) -> nn.Conv:
  """A 2-D convolution padded as torch pads it: ``(k - 1) // 2`` per side.

  ``"SAME"`` would pad a stride-2 convolution of an even input
  asymmetrically (0 before, 1 after) where torch pads 1 on both sides, which
  shifts every pretrained feature map by half a pixel.
  """
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                 use_bias=use_bias, kernel_init=conv_init, name=name)


def batch_norm(name: str | None = None) -> nn.BatchNorm:
  """``torch.nn.BatchNorm2d`` defaults: momentum 0.1 (Flax: 0.9), eps 1e-5.

  ``use_running_average`` is left unset so that callers pass it per call
  (``not train``) and :mod:`lowrank_vjp.rules` can override it per layer.
  """
  return nn.BatchNorm(momentum=0.9, epsilon=1e-5, name=name)


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  """``[N, H, W, C] -> [N, C]``."""
  return jnp.mean(x, axis=(1, 2))
