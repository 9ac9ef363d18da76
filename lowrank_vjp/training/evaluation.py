"""Top-1 accuracy of a trained model on a split or on arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_vjp import models
from lowrank_vjp.training.data import Split


def make_eval_step(model, image_size: int):
  """``eval_step(variables, images, labels, mask) -> int32[]`` (jitted).

  Args:
    model: The Linen model, applied with ``train=False``.
    image_size: Side of the images for :func:`lowrank_vjp.models.preprocess`.

  Returns:
    The jitted step: how many of the ``mask``-ed examples of ``uint8[N, H,
    W, C]`` images are classified as their ``int32[N]`` labels.
  """
  def eval_step(variables, images, labels, mask):
    logits = model.apply(variables, models.preprocess(images, image_size),
                         train=False)
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return jnp.sum(correct)

  return jax.jit(eval_step)


def evaluate(eval_step, variables, split: Split, *, image_size: int,
             examples: int, batch_size: int) -> float:
  """Top-1 accuracy on the first ``examples`` of ``split``.

  The last batch is padded to ``batch_size`` (one compile) and masked.

  Args:
    eval_step: From :func:`make_eval_step`.
    variables: The model's variables.
    split: The test split.
    image_size: Side the images are resized to.
    examples: How many examples (0 or less: all).
    batch_size: Evaluation batch size.

  Returns:
    The fraction correct, in ``[0, 1]``.
  """
  n = len(split) if examples <= 0 else min(examples, len(split))
  correct, bs = 0, batch_size
  for start in range(0, n, bs):
    idx = np.arange(start, min(start + bs, n))
    images, labels = split.get(idx, image_size)
    pad = bs - len(idx)
    mask = np.arange(bs) < len(idx)
    if pad:
      images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
      labels = np.concatenate([labels, np.repeat(labels[-1:], pad, 0)])
    correct += int(eval_step(variables, images, labels, mask))
  return correct / max(n, 1)


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
