"""Accuracy and loss of a trained model on a split, or accuracy on arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_vjp import models
from lowrank_vjp._src.flax import precision as flax_precision
from lowrank_vjp.training import precision
from lowrank_vjp.training.data import Split


def make_eval_step(model, image_size: int | None, dtype=None):
  """``eval_step(variables, inputs, labels, mask) -> (correct, loss, count)``.

  Args:
    model: The Linen model, applied with ``train=False``.
    image_size: Side of the images for :func:`lowrank_vjp.models.preprocess`;
      None feeds the inputs as they are (tokens).
    dtype: Compute dtype (:func:`lowrank_vjp.flax.compute_dtype`), as the
      training step's; None: float32. The loss is taken in float32.

  Returns:
    The jitted step, over the ``mask``-ed examples (``bool[N]``): how many
    predictions equal their labels, the summed softmax cross-entropy, and
    how many predictions there were — one per example for ``[N, classes]``
    logits, one per token (pixel) for ``[N, T, classes]`` logits against
    ``int32[N, T]`` labels.
  """
  def eval_step(variables, inputs, labels, mask):
    x = inputs if image_size is None else models.preprocess(inputs,
                                                            image_size)
    with flax_precision.compute_dtype(dtype):
      logits = model.apply(variables, precision.cast_input(x, dtype),
                           train=False)
    logits = precision.loss_logits(logits)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    m = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (ce.ndim - 1)),
                         ce.shape)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) & m)
    return correct, jnp.sum(jnp.where(m, ce, 0.0)), jnp.sum(m)

  return jax.jit(eval_step)


def evaluate_metrics(eval_step, variables, split, *, image_size: int | None,
                     examples: int, batch_size: int) -> dict[str, float]:
  """Accuracy and mean loss on the first ``examples`` of ``split``.

  The last batch is padded to ``batch_size`` (one compile) and masked.

  Args:
    eval_step: From :func:`make_eval_step`.
    variables: The model's variables.
    split: The held-out split (a :class:`~lowrank_vjp.training.Split` or
      :class:`~lowrank_vjp.training.text.TextSplit`).
    image_size: Side the images are resized to (None for text).
    examples: How many examples (0 or less: all).
    batch_size: Evaluation batch size.

  Returns:
    ``{"accuracy": fraction correct, "loss": mean cross-entropy}`` over
    every prediction (per token for a language model).
  """
  n = len(split) if examples <= 0 else min(examples, len(split))
  correct, loss, count, bs = 0, 0.0, 0, batch_size
  for start in range(0, n, bs):
    idx = np.arange(start, min(start + bs, n))
    inputs, labels = split.get(idx, image_size)
    pad = bs - len(idx)
    mask = np.arange(bs) < len(idx)
    if pad:
      inputs = np.concatenate([inputs, np.repeat(inputs[-1:], pad, 0)])
      labels = np.concatenate([labels, np.repeat(labels[-1:], pad, 0)])
    hits, total, preds = eval_step(variables, inputs, labels, mask)
    correct += int(hits)
    loss += float(total)
    count += int(preds)
  return {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1)}


def evaluate(eval_step, variables, split: Split, *, image_size: int | None,
             examples: int, batch_size: int) -> float:
  """Top-1 accuracy on the first ``examples`` of ``split``
  (:func:`evaluate_metrics`' ``"accuracy"``), in ``[0, 1]``."""
  return evaluate_metrics(eval_step, variables, split, image_size=image_size,
                          examples=examples,
                          batch_size=batch_size)["accuracy"]


def evaluate_arrays(model, variables, inputs, labels, *,
                    image_size: int | None = None, batch: int = 250) -> float:
  """Top-1 accuracy on in-memory ``inputs`` (images or cached features).

  Args:
    model: The Linen model (or a
      :class:`~lowrank_vjp.training.cached_features.FromBlock`), applied
      with ``train=False``.
    variables: Its variables.
    inputs: ``[N, ...]``: images when ``image_size`` is set (they go through
      :func:`lowrank_vjp.models.preprocess`), else the model's input as is.
    labels: ``int32[N]``.
    image_size: Side of the images, or None for cached features.
    batch: Evaluation batch size.

  Returns:
    The fraction correct, in ``[0, 1]``.
  """
  @jax.jit
  def predict(v, x):
    if image_size is not None:
      x = models.preprocess(x, image_size)
    return jnp.argmax(model.apply(v, x, train=False), -1)

  correct = 0
  for s in range(0, len(labels), batch):
    correct += int(jnp.sum(predict(variables, inputs[s:s + batch])
                           == labels[s:s + batch]))
  return correct / len(labels)
