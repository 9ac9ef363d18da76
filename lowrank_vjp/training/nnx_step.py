"""train.py's job through Flax NNX (``--api nnx``).

The NNX twin of :mod:`lowrank_vjp.training.step`: the same model (an NNX
model from :mod:`lowrank_vjp.models.nnx`, loaded with the Linen job's
initial variables, pretrained or not), the same rules (applied in place by
:func:`lowrank_vjp.nnx.apply`), the same optimizer, loss and metrics, and a
step with the same signature, ``train_step(state, frozen, images, labels,
capacities=None) -> (state, metrics)``, so that the loop, the rank
controller's redo, the checkpoints and the memory and time figures are
train.py's own.

The step is NNX's functional form: the model is split once into what
changes (the trained parameters, the trained BatchNorms' statistics, the
method states: donated) and what does not (``frozen``); each step merges
them, differentiates ``nnx.DiffState(0, plan.wrt)`` with
``nnx.value_and_grad`` and updates an ``nnx.Optimizer``, inside one
``jax.jit`` that can be lowered and compiled ahead of time like the Linen
step (``nnx.jit`` gives the same program; its calls go through NNX's graph
handling, and it has no ahead-of-time ``lower``).

The state is a dict: ``"step"`` (``int32[]``), ``"model"`` (the
``nnx.State`` that changes) and ``"opt"`` (the optimizer's ``nnx.State``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lowrank_vjp as lv
from lowrank_vjp import models
from lowrank_vjp.models import nnx as models_nnx
from lowrank_vjp.training import model as model_lib
from lowrank_vjp.training import precision
from lowrank_vjp.training.config import TrainConfig


def _gpt_small(num_classes, image_size, **kwargs):
  del image_size
  return models_nnx.GPT(**{"vocab_size": num_classes, "n_layer": 4,
                           "n_head": 4, "n_embd": 256, **kwargs})


def _vit_tiny(num_classes, image_size, **kwargs):
  return models_nnx.ViT.tiny(num_classes=num_classes, image_size=image_size,
                             **kwargs)


def _cnn(cls):
  return lambda num_classes, image_size, **kw: cls(num_classes=num_classes,
                                                   **kw)


NNX_MODELS = {
    "mobilenet_v2": _cnn(models_nnx.MobileNetV2),
    "resnet18": _cnn(models_nnx.ResNet18),
    "resnet34": _cnn(models_nnx.ResNet34),
    "gpt_small": _gpt_small,
    "vit_tiny": _vit_tiny,
}
"""train.py's models with an NNX version (:mod:`lowrank_vjp.models.nnx`):
``build(num_classes, image_size, **fields, rngs=...)``, the same fields as
the registry's Linen builders."""


def build_nnx_model(config: TrainConfig, num_classes: int, variables,
                    method: str | None = None) -> nnx.Module:
  """The NNX twin of the job's Linen model, holding ``variables``.

  Args:
    config: Reads ``model``, ``model_kwargs``, ``image_size``,
      ``seq_len``, ``scan`` and ``seed``.
    num_classes: Classes of the head (a language model's vocabulary).
    variables: The Linen model's variables (``{"params", "batch_stats"}``),
      from :func:`~lowrank_vjp.training.build_model`: the NNX run starts
      from the same weights as the Linen one.
    method: The run's method (a transformer's neighbour layers, as
      :func:`~lowrank_vjp.training.model.neighbours`).

  Raises:
    ValueError: for a model without an NNX version, and for what the NNX
      transformers do not run (``--scan``; ``checkpoint``'s per-block
      remat).
  """
  if config.model not in NNX_MODELS:
    raise ValueError(
        f"--api nnx: model {config.model!r} has no NNX version; choose one "
        f"of {sorted(NNX_MODELS)} (or --api linen).")
  kwargs = model_lib.model_kwargs(config, method)
  for field, off in (("scan", False), ("remat", None)):
    if kwargs.get(field, off) != off:
      why = " by the checkpoint run" if field == "remat" else ""
      raise ValueError(
          f"--api nnx: the NNX {config.model} has no {field} (asked for "
          f"{field}={kwargs[field]!r}{why}); use --api linen.")
  model = NNX_MODELS[config.model](
      num_classes, config.image_size, **kwargs,
      rngs=nnx.Rngs(params=config.seed, dropout=config.seed))
  models_nnx.load_linen_variables(model, variables)
  return model


@dataclasses.dataclass(frozen=True)
class _BatchStatsOf:
  """NNX filter: the BatchNorm statistics of the given module paths."""

  paths: frozenset[str]

  def __call__(self, path, value) -> bool:
    return (isinstance(value, nnx.BatchStat)
            and "/".join(map(str, path[:-1])) in self.paths)


@dataclasses.dataclass
class NnxTraining:
  """An NNX model split for training, with its plan and optimizer.

  Attributes:
    plan: What :func:`lowrank_vjp.nnx.apply` did.
    graphdef: The model's graph.
    opt_graphdef: The optimizer's graph.
    carried: The filter of the state that changes.
    state: The initial training state (see the module docstring).
    frozen: The model's state that does not change (not donated).
    dtype: The compute dtype (None: float32), already set on the model's
      layers (:func:`lowrank_vjp.nnx.set_compute_dtype`); float16 adds
      ``state["loss_scale"]``.
  """

  plan: lv.nnx.Plan
  graphdef: Any
  opt_graphdef: Any
  carried: Any
  state: dict[str, Any]
  frozen: Any
  dtype: Any = None

  @classmethod
  def create(cls, model: nnx.Module, plan: lv.nnx.Plan,
             tx: optax.GradientTransformation,
             dtype=None) -> NnxTraining:
    """Splits ``model`` (already planned, and set to compute in ``dtype``)
    and makes its optimizer."""
    carried = nnx.Any(plan.wrt, _BatchStatsOf(frozenset(plan.train_bn)),
                      lv.nnx.MethodState)
    optimizer = nnx.Optimizer(model, tx, wrt=plan.wrt)
    opt_graphdef, opt_state = nnx.split(optimizer)
    graphdef, changing, frozen = nnx.split(model, carried, ...)
    state = {"step": jnp.zeros((), jnp.int32), "model": changing,
             "opt": opt_state}
    dtype = precision.compute_dtype(dtype or "float32")
    loss_scale = precision.init_loss_scale(dtype)
    if loss_scale:
      state["loss_scale"] = loss_scale
    return cls(plan, graphdef, opt_graphdef, carried, state, frozen, dtype)

  def model(self, state, frozen) -> nnx.Module:
    """The model holding ``state["model"]`` and ``frozen``."""
    return nnx.merge(self.graphdef, state["model"], frozen)

  def make_train_step(self, seed: int, image_size: int | None,
                      donate: bool = True, redo_on_overflow: bool = False):
    """The jitted step, as :func:`lowrank_vjp.training.make_train_step`.

    Dropout keys are ``fold_in(key(seed), step)`` (``nnx.reseed`` of the
    ``"dropout"`` stream each step), so a resumed run draws the same ones.
    The input is cast to the compute dtype, the loss is taken on float32
    logits, and a float16 step scales its loss as the Linen step does
    (``metrics["loss_scale"]``, ``metrics["skipped"]``).
    """
    base_key = jax.random.key(seed)
    wrt = self.plan.wrt
    dtype = self.dtype

    def train_step(state, frozen, images, labels, capacities=None):
      x = (images if image_size is None
           else models.preprocess(images, image_size))
      x = precision.cast_input(x, dtype)
      model = self.model(state, frozen)
      nnx.reseed(model, dropout=jax.random.fold_in(base_key, state["step"]))
      loss_scale = state.get("loss_scale", {})

      def loss_fn(model):
        logits = model(x, train=True)
        logits = precision.loss_logits(logits)
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits, labels).mean()
        return precision.scale_loss(loss, loss_scale), (loss, logits)

      with lv.rank_capacities(capacities):
        (_, (loss, logits)), grads = nnx.value_and_grad(
            loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
      grads, finite = precision.unscale(grads, loss_scale)
      stats = lv.nnx.stats(model)
      overflow = jnp.zeros((), bool)
      for s in stats.values():
        overflow = overflow | jnp.any(s.overflow)
      forward = nnx.state(model, self.carried)  # new BN stats, ASI state

      # The update's inputs go in as operands (not closed over), so that the
      # branch merges its own Variables at its own trace level.
      def updated(operands):
        state, forward, frozen, grads = operands
        m = nnx.merge(self.graphdef, forward, frozen)
        optimizer = nnx.merge(self.opt_graphdef, state["opt"])
        optimizer.update(m, grads)
        new = {"step": state["step"] + 1,
               "model": nnx.state(m, self.carried),
               "opt": nnx.state(optimizer)}
        if loss_scale:
          new["loss_scale"] = precision.next_loss_scale(loss_scale, finite)
        return new

      def skipped(operands):  # float16: some gradient overflowed
        state = operands[0]
        return {**state, "step": state["step"] + 1,
                "loss_scale": precision.next_loss_scale(loss_scale, finite)}

      apply = updated
      if loss_scale:
        apply = lambda o: jax.lax.cond(finite, updated, skipped, o)
      operands = (state, forward, frozen, grads)
      probe = redo_on_overflow and capacities is None  # as the Linen step
      if probe:
        new_state = state
      elif redo_on_overflow:  # as the Linen step: a conditional, not a select
        new_state = jax.lax.cond(overflow, lambda o: o[0], apply, operands)
      else:
        new_state = apply(operands)
      metrics = {"loss": loss,
                 "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
                 "stats": stats, "overflow": overflow}
      if redo_on_overflow:
        metrics["redo"] = jnp.ones((), bool) if probe else overflow
      if loss_scale:
        metrics["loss_scale"] = loss_scale["scale"]
        metrics["skipped"] = ~finite
      return new_state, metrics

    return jax.jit(train_step, donate_argnums=(0,) if donate else (),
                   static_argnames="capacities")

  def make_eval_step(self, image_size: int | None):
    """``eval_step((state["model"], frozen), inputs, labels, mask)``, as
    :func:`lowrank_vjp.training.make_eval_step` (``model(x, train=False)``,
    in the compute dtype).
    """
    def eval_step(variables, inputs, labels, mask):
      changing, frozen = variables
      x = inputs if image_size is None else models.preprocess(inputs,
                                                              image_size)
      model = nnx.merge(self.graphdef, changing, frozen)
      model.eval()   # the compressed layers run their own contraction
      x = precision.cast_input(x, self.dtype)
      logits = model(x, train=False)
      logits = precision.loss_logits(logits)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      m = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (ce.ndim - 1)),
                           ce.shape)   # per example, or per token
      correct = jnp.sum((jnp.argmax(logits, -1) == labels) & m)
      return correct, jnp.sum(jnp.where(m, ce, 0.0)), jnp.sum(m)

    return jax.jit(eval_step)


def nnx_training(config: TrainConfig, num_classes: int, variables,
                 x_spec: jax.ShapeDtypeStruct, settings,
                 tx: optax.GradientTransformation, spec: models.ModelSpec,
                 method: str | None = None) -> NnxTraining:
  """The NNX job of ``config``: model, rules, plan, split and optimizer.

  The rules are train.py's (:func:`~lowrank_vjp.training.make_rules`) over
  the NNX model's layers, whose paths are the Linen model's.
  """
  model = build_nnx_model(config, num_classes, variables, method)
  lv.nnx.set_compute_dtype(model, config.dtype)
  layers = lv.nnx.discover(model, x_spec, train=True)
  rules = model_lib.make_rules(config, layers, spec, settings)
  plan = lv.nnx.apply(model, rules, x_spec, train=True)
  return NnxTraining.create(model, plan, tx, config.dtype)
