"""The model of a fine-tuning job and the rules choosing its trained layers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import lowrank_vjp.rules as lvr
from lowrank_vjp import models
from lowrank_vjp.training import methods
from lowrank_vjp.training.config import TrainConfig


def input_spec(config: TrainConfig, batch: int) -> jax.ShapeDtypeStruct:
  """The model's input at ``batch``: images of ``config.image_size`` or
  ``config.seq_len`` tokens (:meth:`lowrank_vjp.models.ModelSpec.example`).
  """
  spec = models.get_spec(config.model)
  return spec.example(batch, config.seq_len if spec.inputs == "tokens"
                      else config.image_size)


def neighbours(spec: models.ModelSpec, method: str | None) -> dict[str, Any]:
  """The transformer fields of a run (:class:`lowrank_vjp.models.GPT`'s
  attention, norm, activation, remat): ``{}`` for CNNs.

  Vanilla runs Flax's and JAX's own layers; ``"checkpoint"`` runs them with
  every block under ``nn.remat`` (per-block ``jax.checkpoint``); any other
  method runs the library's (blockwise attention, LayerNorm codes, coded
  GELU), so that its whole step keeps small residuals.
  """
  if spec.blocks is None or method is None:
    return {}
  vanilla = dict(attention="jax", norm_method="flax", activation="jax")
  if methods.is_vanilla(method):
    return vanilla
  if methods.is_checkpoint(method):
    return {**vanilla, "remat": "full"}
  return {}


def model_kwargs(config: TrainConfig, method: str | None = None
                 ) -> dict[str, Any]:
  """The model's constructor fields of a run beside ``num_classes``:
  ``config.model_kwargs``, a transformer's neighbours (:func:`neighbours`),
  a language model's ``block_size`` and ``scan``.

  Raises:
    ValueError: for ``scan`` on a model without transformer blocks.
  """
  spec = models.get_spec(config.model)
  kwargs = {**json.loads(config.model_kwargs), **neighbours(spec, method)}
  if spec.inputs == "tokens":
    kwargs["block_size"] = config.seq_len
  if config.scan:
    if spec.blocks is None:
      raise ValueError(f"scan: {config.model} has no transformer blocks to "
                       "scan over")
    kwargs["scan"] = True
  return kwargs


def build_model(config: TrainConfig, num_classes: int,
                log: Callable[[str], object] = print,
                method: str | None = None):
  """The model with ``num_classes`` outputs, pretrained where possible.

  Args:
    config: Reads ``model``, ``model_kwargs``, ``weights``,
      ``image_size``, ``seq_len``, ``scan`` and ``seed``.
    num_classes: Size of the new classifier head (a language model's
      vocabulary).
    log: Called with a warning when no offline weights exist.
    method: The run's method, which chooses a transformer's neighbour
      layers (:func:`neighbours`); None: the model's defaults.

  Returns:
    ``(model, variables, spec, weights_path_or_None)``.

  Example:
    >>> model, variables, spec, path = build_model(
    ...     TrainConfig(weights="none", image_size=32), 10)
  """
  spec = models.get_spec(config.model)
  kwargs = model_kwargs(config, method)
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
        seed=config.seed, **kwargs)
  else:
    model = spec.build(num_classes=num_classes, **kwargs)
    x = input_spec(config, 1)
    variables = jax.jit(model.init)(jax.random.key(config.seed),
                                    jnp.zeros(x.shape, x.dtype))
  return model, variables, spec, path


def make_rules(config: TrainConfig, layers: Sequence[lvr.Layer],
               spec: models.ModelSpec,
               settings: Mapping[str, Any]) -> tuple[lvr.Rule, ...]:
  """The rules of ``config.layers``: the last k conv layers, all, or a regex.

  Args:
    config: Reads ``layers`` (``"k"``, ``"all"``: every conv layer,
      downsampling ones included, as ``peak_memory``'s ``k = "all"``, or a
      regex of module paths) and ``train_bn``.
    layers: The model's layers, from :func:`lowrank_vjp.rules.discover`.
    spec: The model's spec (excluded layers, head).
    settings: Settings of the compressed layers.

  Returns:
    Rules for :func:`lowrank_vjp.rules.make_plan`; the head is trained,
    uncompressed. For a transformer (``spec.blocks``) see
    :func:`transformer_rules`.
  """
  if spec.blocks is not None:
    return transformer_rules(config, layers, spec, settings)
  if config.layers.strip() == "all":
    k = sum(1 for layer in layers if layer.kind == "conv")
    return lvr.fine_tune_last(layers, k, settings, exclude=None,
                              head=spec.head, train_bn=config.train_bn)
  if re.fullmatch(r"\d+", config.layers.strip()):
    return lvr.fine_tune_last(layers, int(config.layers), settings,
                              exclude=spec.exclude, head=spec.head,
                              train_bn=config.train_bn)
  return (lvr.Rule(config.layers, settings, config.train_bn),
          lvr.Rule(spec.head))


_DENSE = r"(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)"
"""The dense layers of a transformer block, below the block's path."""


def transformer_rules(config: TrainConfig, layers: Sequence[lvr.Layer],
                      spec: models.ModelSpec,
                      settings: Mapping[str, Any]) -> tuple[lvr.Rule, ...]:
  """Rules of a transformer: its blocks' dense layers take ``settings``.

  ``config.layers``: ``"all"`` trains everything (the dense layers of every
  block compressed, the rest — embeddings, norms, head — uncompressed);
  ``"k"`` trains the last ``k`` blocks so, with the final norm and the head
  (the embeddings stay frozen); anything else is a regex of module paths,
  as for CNNs. A model whose blocks run as one ``nn.scan`` (``scan=True``:
  paths ``h/attn/c_attn``) trains with ``"all"`` only.

  Raises:
    ValueError: when ``k`` exceeds the number of blocks, or for ``k`` or a
      regex with scanned blocks.
  """
  scanned = spec.blocks.rstrip("_")
  if any(layer.path == scanned for layer in layers):  # one nn.scan of all
    if config.layers.strip() != "all":
      raise ValueError(f"layers={config.layers!r}: the blocks of a scanned "
                       f"{config.model} share stacked parameters and train "
                       "together; give 'all'")
    return (lvr.Rule(f"{re.escape(scanned)}/{_DENSE}", settings),
            lvr.Rule(".*"))
  tops = {layer.path.split("/")[0] for layer in layers}
  blocks = sorted((t for t in tops
                   if re.fullmatch(re.escape(spec.blocks) + r"\d+", t)),
                  key=lambda b: int(b[len(spec.blocks):]))
  which = config.layers.strip()
  if which == "all":
    chosen, rest = blocks, [lvr.Rule(".*")]
  elif re.fullmatch(r"\d+", which):
    k = int(which)
    if not 1 <= k <= len(blocks):
      raise ValueError(f"layers={which!r}: {config.model} has "
                       f"{len(blocks)} blocks; give 1..{len(blocks)} or "
                       "'all'")
    chosen = blocks[-k:]
    rest = [lvr.Rule("ln_f")] + ([lvr.Rule(spec.head)] if spec.head else [])
  else:
    return (lvr.Rule(which, settings), lvr.Rule(spec.head or "ln_f"))
  ids = "|".join(re.escape(b) for b in chosen)
  return (lvr.Rule(f"({ids})/{_DENSE}", settings),
          lvr.Rule(f"({ids})/.*"), *rest)
