"""Flax (Linen) models: MobileNetV2, ResNet18/34, MCUNet (pretrained-compatible)
a GPT-style causal LM and a ViT.

Module names follow the PyTorch originals (torchvision, MCUNet), so
``from_torch`` loads their ``.pth`` state dicts key by key, and module paths
(``features/17/conv/1/0``) read like the torch names
(``features.17.conv.1.0``) in :mod:`lowrank_vjp.rules`. Activations are
:func:`lowrank_vjp.relu` / :func:`lowrank_vjp.relu6` (1-bit residuals).
"""

from lowrank_vjp.models._convert import WeightConversionError, from_torch
from lowrank_vjp.models._gpt import GPT
from lowrank_vjp.models._mcunet import MCUNet
from lowrank_vjp.models._mobilenet_v2 import MobileNetV2
from lowrank_vjp.models._registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODELS,
    ModelSpec,
    default_weights,
    get_spec,
    init,
    init_missing,
    load_torch_state_dict,
    mobilenet_v2_weights,
    preprocess,
    pretrained,
)
from lowrank_vjp.models._resnet import ResNet, ResNet18, ResNet34
from lowrank_vjp.models._torch_weights import (
    TorchCheckpointError,
    load_torch_checkpoint,
)
from lowrank_vjp.models._vit import ViT

__all__ = (
    "GPT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MCUNet",
    "MODELS",
    "MobileNetV2",
    "ModelSpec",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "TorchCheckpointError",
    "ViT",
    "WeightConversionError",
    "default_weights",
    "from_torch",
    "get_spec",
    "init",
    "init_missing",
    "load_torch_checkpoint",
    "load_torch_state_dict",
    "mobilenet_v2_weights",
    "preprocess",
    "pretrained",
)
