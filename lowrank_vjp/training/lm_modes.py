"""Which compression pays on token activations: weight-gradient error against
residual bytes, per method and per choice of compressed modes.

A dense layer of a transformer sees ``[batch, tokens, features]``
activations. HOSVD can truncate any of the three modes; the batch-mode SVD
only the first; codes keep every entry at fewer bits. This module measures,
on one batch and one set of parameters (a trained model's, to be
meaningful), each setting's relative error of every dense layer's kernel
gradient against exact backprop, beside the bytes its residuals would keep
at the ranks ε needed. The neighbours (attention, LayerNorm, GELU) run
exact, so only the dense layers' compression differs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import lowrank_vjp as lv
import lowrank_vjp.rules as lvr

DENSE = r"(.*/)?(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)"
"""Module paths of the dense layers whose gradients are compared."""


FULL = "full"
"""A ``ranks`` entry of :func:`settings_grid`: the whole axis is the
capacity, so ε alone decides the rank."""


def settings_grid() -> dict[str, dict[str, Any]]:
  """The settings compared by ``experiments/token_modes.py``, by label.

  ``ranks`` entries are :data:`FULL` (compressed; ε decides) or None (that
  mode is not compressed), for the ``[batch, tokens, features]`` axes.
  """
  all3, feature = (FULL, FULL, FULL), (None, None, FULL)
  return {
      "hosvd eps=0.9, all modes": {"method": "hosvd", "eps": 0.9,
                                   "ranks": all3},
      "hosvd eps=0.9, batch+token": {"method": "hosvd", "eps": 0.9,
                                     "ranks": (FULL, FULL, None)},
      "hosvd eps=0.9, feature": {"method": "hosvd", "eps": 0.9,
                                 "ranks": feature},
      "hosvd eps=0.99, all modes": {"method": "hosvd", "eps": 0.99,
                                    "ranks": all3},
      "hosvd eps=0.99, feature": {"method": "hosvd", "eps": 0.99,
                                  "ranks": feature},
      "hosvd eps=0.999, all modes": {"method": "hosvd", "eps": 0.999,
                                     "ranks": all3},
      "svd eps=0.9 (batch mode)": {"method": "svd", "eps": 0.9,
                                   "ranks": (FULL, None, None)},
      "quant 8-bit": {"method": "quant", "bits": 8},
      "quant 8-bit per channel": {"method": "quant", "bits": 8,
                                  "per_channel": True},
      "quant 4-bit": {"method": "quant", "bits": 4},
      "quant 4-bit per channel": {"method": "quant", "bits": 4,
                                  "per_channel": True},
  }


def for_shape(settings: Mapping[str, Any], shape) -> dict[str, Any]:
  """``settings`` with :data:`FULL` ranks entries set to ``shape``'s axes."""
  out = dict(settings)
  if isinstance(out.get("ranks"), tuple):
    out["ranks"] = tuple(int(n) if r == FULL else r
                         for r, n in zip(out["ranks"], shape, strict=True))
  return out


def _kernel_grads(grads) -> dict[str, jax.Array]:
  flat = traverse_util.flatten_dict(grads)
  return {"/".join(k[:-1]): v for k, v in flat.items() if k[-1] == "kernel"}


def gradient_errors(model, params, tokens, targets,
                    grid: Mapping[str, Mapping[str, Any]]
                    ) -> dict[str, dict[str, float]]:
  """Per setting: the dense kernels' gradient error and residual share.

  Args:
    model: A :class:`lowrank_vjp.models.GPT` (its dense layers at
      :data:`DENSE`); run it with exact neighbours
      (``attention="jax", norm_method=None, activation="jax"``) to isolate
      the dense layers.
    params: Its parameters.
    tokens: ``int32[B, T]`` inputs.
    targets: ``int32[B, T]`` next tokens.
    grid: ``{label: layer settings}``, e.g. :func:`settings_grid`
      (:data:`FULL` ranks entries are set per layer, :func:`for_shape`).

  Returns:
    ``{label: {"median_error", "max_error", "median_cosine",
    "residual_fraction", "worst_layer"}}``: the relative error
    ``‖ĝ − g‖ / ‖g‖`` of every dense kernel's gradient (median and largest
    over layers), the median cosine similarity, the residual bytes at the
    ranks ε needed over the dense layers' input bytes
    (:meth:`CompressionStats.analytic_nbytes`), and the layer with the
    largest error.
  """
  variables = {"params": params}
  layers = lvr.discover(model, tokens, variables=variables)
  dense = [layer for layer in layers if layer.kind == "dense"
           and lvr.Rule(DENSE).matches(layer.path)]

  def run(settings):
    rules = [lvr.Rule(re.escape(layer.path),
                      for_shape(settings, layer.input_shape))
             for layer in dense] + [lvr.Rule(".*")]
    plan = lvr.make_plan(layers, rules)

    def loss(p):
      with plan.intercept():
        logits, state = model.apply({"params": p}, tokens,
                                    mutable=["compression"])
      value = optax.softmax_cross_entropy_with_integer_labels(
          logits, targets).mean()
      return value, lv.flax.collect_stats(state)

    (_, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        params)
    return _kernel_grads(grads), stats

  exact, _ = run({"method": "none"})
  paths = [layer.path for layer in dense]
  out = {}
  for label, settings in grid.items():
    grads, stats = run(settings)
    err = [float(jnp.linalg.norm(grads[k] - exact[k])
                 / jnp.linalg.norm(exact[k])) for k in paths]
    cos = [float(jnp.vdot(grads[k], exact[k]) / jnp.linalg.norm(grads[k])
                 / jnp.linalg.norm(exact[k])) for k in paths]
    kept = [s for p, s in stats.items() if p in paths]
    out[label] = {
        "median_error": float(np.median(err)),
        "max_error": float(np.max(err)),
        "median_cosine": float(np.median(cos)),
        "residual_fraction": sum(s.analytic_nbytes() for s in kept)
                             / sum(s.activation_nbytes * s.calls
                                   for s in kept),
        "worst_layer": paths[int(np.argmax(err))],
    }
  return out
