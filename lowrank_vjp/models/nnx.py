"""Flax NNX models: MobileNetV2, ResNet18/34, GPT and ViT, path for path the
Linen ones.

Each NNX model has the module paths of its Linen twin in
:mod:`lowrank_vjp.models` (``features/17/conv/1/0`` is
``("features", "17", "conv", "1", "0")`` in ``nnx.iter_graph``), so Linen
variables, and with them torchvision's ImageNet weights, load with
:func:`load_linen_variables`, and path-based rules read the same. Layer
settings (torch padding, initialisers, BatchNorm momentum 0.9 and epsilon
1e-5) are Linen's; activations are :func:`lowrank_vjp.relu` /
:func:`lowrank_vjp.relu6`. ``model(x, train=True)`` uses batch statistics
and updates the running ones in place (and runs dropout); the default is
evaluation.

:class:`GPT` and :class:`ViT` are the transformers (``h_0/attn/c_attn``,
``blocks_0/mlp/c_fc``, ``ln_f``, …) with the Linen models' neighbour fields
(``attention``, ``norm_method``, ``activation``, ``attention_method``; no
``remat`` or ``scan``); their dense layers are ``nnx.Linear`` that
:func:`lowrank_vjp.nnx.apply` can compress, and the library's LayerNorms
record their statistics for :func:`lowrank_vjp.nnx.stats` (under
``"h_0/ln_1"``, …). ``train`` changes nothing in them (no dropout). NNX
builds ViT's ``pos_embed`` up front, so it takes ``image_size`` (and
``in_channels``).

Example::

  from flax import nnx
  from lowrank_vjp import models
  import lowrank_vjp.models.nnx as mnnx

  model = mnnx.pretrained_mobilenet_v2(rngs=nnx.Rngs(0))
  logits = model(models.preprocess(images, 224))       # [N, 1000]

  # Any Linen variables with the same paths (here a ResNet-18 .pth file):
  _, variables = models.pretrained("resnet18", weights="resnet18.pth")
  resnet = mnnx.ResNet18(rngs=nnx.Rngs(0))
  mnnx.load_linen_variables(resnet, variables)

  gpt = mnnx.GPT(vocab_size=256, block_size=128, rngs=nnx.Rngs(0))
  logits = gpt(tokens)                                 # [B, T, 256]
"""

from lowrank_vjp.models._nnx_common import (
  load_linen_variables as load_linen_variables,
)
from lowrank_vjp.models._nnx_gpt import GPT as GPT
from lowrank_vjp.models._nnx_mobilenet_v2 import MobileNetV2 as MobileNetV2
from lowrank_vjp.models._nnx_mobilenet_v2 import (
  pretrained_mobilenet_v2 as pretrained_mobilenet_v2,
)
from lowrank_vjp.models._nnx_resnet import ResNet as ResNet
from lowrank_vjp.models._nnx_resnet import ResNet18 as ResNet18
from lowrank_vjp.models._nnx_resnet import ResNet34 as ResNet34
from lowrank_vjp.models._nnx_vit import ViT as ViT

__all__ = (
    "GPT",
    "MobileNetV2",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ViT",
    "load_linen_variables",
    "pretrained_mobilenet_v2",
)
