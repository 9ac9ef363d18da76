"""The settings of a fine-tuning job: one frozen, hashable dataclass.

:class:`TrainConfig` holds what ``experiments/train.py``'s flags set (its
fields are the flags' destinations, so ``TrainConfig(**vars(args))`` reads
them, and the flags take their defaults from it). Other experiments start
from it for train.py's optimizer, schedule and rank control.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """How to fine-tune the last layers of a pretrained classifier.

  Attributes:
    model: A name of :data:`lowrank_vjp.models.MODELS`.
    api: ``"linen"`` (default) or ``"nnx"``: the same job through Flax NNX
      (:mod:`lowrank_vjp.training.nnx_step`; the CNNs of
      ``lowrank_vjp.models.nnx``).
    dtype: Compute dtype, ``"float32"`` (default), ``"bfloat16"`` or
      ``"float16"``: parameters, optimizer state and BatchNorm running
      averages stay float32 (:mod:`lowrank_vjp.training.precision`).
    model_kwargs: JSON of further fields for the model's constructor
      (e.g. ``{"depth": 4}`` for a shallower ViT).
    weights: ImageNet ``.pth`` file; ``"auto"``: the offline file if the
      model has one (else random init, with a warning); ``"none"``.
    method: Comma-separated runs: ``"vanilla"`` or any method of
      :func:`lowrank_vjp.flax.conv_cls`; each run is one method.
    eps: Explained variance kept (methods that use it).
    method_kwargs: JSON of further settings for the compressed layers.
    layers: ``k`` (fine-tune the last k conv layers, counted as the papers
      do), ``"all"`` (every layer) or a regex of module paths.
    train_bn: Train the BatchNorms of the fine-tuned layers.
    dataset: ``"auto"``, ``"debian_fashion_mnist"``, ``"sklearn_digits"``
      or any tfds dataset prepared in ``data_dir``.
    data_dir: tfds data directory.
    steps: Training steps.
    batch_size: Training batch size.
    image_size: Side of the model's input images.
    seq_len: Tokens per example (language models).
    scan: Run a transformer's blocks as one ``nn.scan``.
    optimizer: ``"sgd"`` or ``"adam"``.
    lr: Peak learning rate of the warm-up cosine schedule.
    momentum: SGD momentum.
    weight_decay: Decoupled weight decay (0: off).
    warmup_steps: Linear warm-up steps.
    clip_grad_norm: Clip gradients to this global norm (0: off).
    eval_examples: Test examples evaluated at the end (0: all).
    eval_batch_size: Evaluation batch size.
    eval_every: Also evaluate every this many steps (0: at the end only);
      the figures go into ``metrics.jsonl`` and the validation-loss plot.
    max_batch_budget_mib: Report the largest batch whose step fits this
      many MiB of XLA's estimated peak (0: not searched).
    checkpoint_every: Steps between checkpoints.
    rank_control: ``"redo"`` (a :class:`lowrank_vjp.RankController` moves
      the capacities and recomputes overflowing steps) or ``"off"``.
    rank_patience: Steps before a capacity may shrink.
    rank_headroom: Grow a capacity to the rung holding headroom × need.
    rank_shrink_every: Shrink capacities only at a review every this many
      steps, all layers together (0: each mode when its patience runs out);
      fewer settings, and each one known ahead.
    rank_background_compile: Compile a new capacity setting in a
      background thread while the steps run at a compiled one that holds
      at least as much (:func:`~lowrank_vjp.training.run_step`), so that a
      change does not stall training for a compile; False: every new
      setting compiles before its step.
    workdir: Output directory.
    seed: Seed of initialisation, batches and dropout.
    no_progress: No progress bar.
    fresh: Delete earlier checkpoints and metrics instead of resuming.
    interrupt_at: Stop after this step as if preempted (tests).

  Example:
    >>> config = TrainConfig(steps=2, batch_size=4, image_size=32)
    >>> config.optimizer, config.lr
    ('sgd', 0.01)
  """

  model: str = "mobilenet_v2"
  api: str = "linen"
  dtype: str = "float32"
  model_kwargs: str = "{}"
  weights: str = "auto"
  method: str = "vanilla,hosvd"
  eps: float = 0.8
  method_kwargs: str = "{}"
  layers: str = "4"
  train_bn: bool = False
  dataset: str = "auto"
  data_dir: str | None = None
  steps: int = 200
  batch_size: int = 32
  image_size: int = 96
  seq_len: int = 128
  scan: bool = False
  optimizer: str = "sgd"
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 0.0
  warmup_steps: int = 10
  clip_grad_norm: float = 1.0
  eval_examples: int = 2000
  eval_batch_size: int = 100
  eval_every: int = 0
  max_batch_budget_mib: float = 0.0
  checkpoint_every: int = 100
  rank_control: str = "redo"
  rank_patience: int = 50
  rank_headroom: float = 1.0
  rank_shrink_every: int = 0
  rank_background_compile: bool = True
  workdir: str = "workdir"
  seed: int = 0
  no_progress: bool = False
  fresh: bool = False
  interrupt_at: int | None = None

  def __post_init__(self):
    if self.api not in ("linen", "nnx"):
      raise ValueError(f"api must be 'linen' or 'nnx', got {self.api!r}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError("dtype must be 'float32', 'bfloat16' or 'float16', "
                       f"got {self.dtype!r}")

  @classmethod
  def from_flags(cls, flags: Mapping[str, Any]) -> TrainConfig:
    """The config of train.py's flags; a flag left None takes the model's
    default (:attr:`lowrank_vjp.models.ModelSpec.defaults`), else the
    field's.

    Example:
      >>> TrainConfig.from_flags({"model": "gpt_small"}).optimizer
      'adam'
      >>> TrainConfig.from_flags({"model": "gpt_small", "lr": 0.1}).lr
      0.1
    """
    from lowrank_vjp import models  # pylint: disable=g-import-not-at-top
    model = flags.get("model") or cls.model
    given = {k: v for k, v in flags.items() if v is not None}
    return cls(**{**dict(models.get_spec(model).defaults), **given})

  def replace(self, **changes) -> TrainConfig:
    """A copy with ``changes`` (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)
