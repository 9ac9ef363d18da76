"""The optimizer of the fine-tuning jobs: warm-up cosine SGD or AdamW."""

from __future__ import annotations

import optax

from lowrank_vjp.training.config import TrainConfig


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """SGD with momentum (or AdamW) on a warm-up cosine schedule.

  Args:
    config: Reads ``optimizer``, ``lr``, ``momentum``, ``weight_decay``,
      ``warmup_steps``, ``steps`` and ``clip_grad_norm``.

  Returns:
    The transformation: gradient clipping (when ``clip_grad_norm > 0``),
    weight decay (when set) and the optimizer.

  Example:
    >>> tx = make_optimizer(TrainConfig(steps=10))
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.lr, min(config.warmup_steps, max(config.steps - 1, 0)),
      max(config.steps, 1))
  if config.optimizer == "adam":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  else:
    tx = optax.sgd(schedule, momentum=config.momentum)
    if config.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
  if config.clip_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), tx)
  return tx
