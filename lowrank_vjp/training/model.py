"""The model of a fine-tuning job and the rules choosing its trained layers."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lowrank_vjp.rules as lvr
from lowrank_vjp import models
from lowrank_vjp.training.config import TrainConfig


def build_model(config: TrainConfig, num_classes: int,
                log: Callable[[str], object] = print):
  """The model with ``num_classes`` outputs, pretrained where possible.

  Args:
    config: Reads ``model``, ``weights``, ``image_size`` and ``seed``.
    num_classes: Size of the new classifier head.
    log: Called with a warning when no offline weights exist.

  Returns:
    ``(model, variables, spec, weights_path_or_None)``.

  Example:
    >>> model, variables, spec, path = build_model(
    ...     TrainConfig(weights="none", image_size=32), 10)
  """
  spec = models.get_spec(config.model)
  path = None
  if config.weights == "auto":
    path = models.default_weights(config.model)
    if path is None:
      log(f"WARNING: no offline ImageNet weights for {config.model} "
          f"({spec.weights}); training from a random initialisation.")
  elif config.weights != "none":
    path = config.weights
  if path is not None:
    model, variables = models.pretrained(
        config.model, num_classes, weights=path, image_size=config.image_size,
        seed=config.seed)
  else:
    model = spec.build(num_classes=num_classes)
    variables = models.init(model, config.image_size, config.seed)
  return model, variables, spec, path


def make_rules(config: TrainConfig, layers: Sequence[lvr.Layer],
               spec: models.ModelSpec,
               settings: Mapping[str, Any]) -> tuple[lvr.Rule, ...]:
  """The rules of ``config.layers``: the last k conv layers, or a regex.

  Args:
    config: Reads ``layers`` (``"k"`` or a regex of module paths) and
      ``train_bn``.
    layers: The model's layers, from :func:`lowrank_vjp.rules.discover`.
    spec: The model's spec (excluded layers, head).
    settings: Settings of the compressed layers.

  Returns:
    Rules for :func:`lowrank_vjp.rules.make_plan`; the head is trained,
    uncompressed.
  """
  if re.fullmatch(r"\d+", config.layers.strip()):
    return lvr.fine_tune_last(layers, int(config.layers), settings,
                              exclude=spec.exclude, head=spec.head,
                              train_bn=config.train_bn)
  return (lvr.Rule(config.layers, settings, config.train_bn),
          lvr.Rule(spec.head))
