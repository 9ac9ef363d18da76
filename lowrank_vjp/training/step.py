"""The jitted training step of a fine-tuning plan, and its state.

``train_step(state, frozen, images, labels, capacities=None) -> (state,
metrics)`` under ``jax.jit`` with the state donated (Flax's examples' shape,
with the frozen variables and a :class:`lowrank_vjp.RankController`'s
capacities beside it). The state is a dict:

* ``"step"``: ``int32[]``;
* ``"params"``: the trained parameters (``plan.split(variables)[0]``);
* ``"batch_stats"``: statistics of the trained BatchNorms (``{}`` if none);
* ``"opt_state"``: the optimizer's state;
* ``"asi_state"``: the factors of the ASI layers (``{}`` if none);
* ``"loss_scale"``: only in a float16 run, its dynamic loss scale
  (:mod:`lowrank_vjp.training.precision`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf
import lowrank_vjp.rules as lvr
from lowrank_vjp import models
from lowrank_vjp._src.flax import precision as flax_precision
from lowrank_vjp.training import methods
from lowrank_vjp.training import precision


def uses_asi(plan: lvr.Plan) -> bool:
  """Whether some layer of ``plan`` runs ASI (factors carried as state)."""
  return any(methods.carries_state(s) for _, s in plan.compressed)


def _like(new, old):
  """``new`` in the dtypes of ``old`` (state keeps one structure)."""
  return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)


def init_asi_state(model, plan: lvr.Plan, variables, x,
                   dtype=None) -> dict:
  """The unstarted ``"asi_state"`` collection of ``plan``'s ASI layers.

  Applies the model once (jitted) under ``plan.intercept()`` to zeros shaped
  like the model input ``x`` (an array or ``jax.ShapeDtypeStruct``) with the
  collection mutable. A layer that creates its state stores it unstarted
  (identity factors, ``started`` False), so the first training step runs
  ASI's exact HOSVD on its own batch.

  Args:
    model: The Linen model (or a
      :class:`~lowrank_vjp.training.cached_features.FromBlock`).
    plan: The fine-tuning plan.
    variables: The model's variables.
    x: The model input, e.g. ``float32[N, S, S, 3]``.
    dtype: The step's compute dtype (:func:`make_train_step`), None for
      float32.

  Returns:
    The collection; ``{}`` when no layer runs ASI.
  """
  if not uses_asi(plan):
    return {}

  def init(variables):
    with plan.intercept(), flax_precision.compute_dtype(dtype):
      _, state = model.apply(
          variables,
          precision.cast_input(jnp.zeros(x.shape, x.dtype), dtype),
          train=True,
          rngs={"dropout": jax.random.key(0)},
          mutable=[lvf.ASI_COLLECTION, "batch_stats"])
    return state.get(lvf.ASI_COLLECTION, {})

  return jax.jit(init)(variables)


def make_train_step(model, plan: lvr.Plan, tx: optax.GradientTransformation,
                    seed: int, image_size: int | None, donate: bool = True,
                    redo_on_overflow: bool = False, dtype=None):
  """``train_step(state, frozen, images, labels, capacities) -> (state, m)``.

  The loss is the mean softmax cross-entropy of the logits against integer
  labels (per example, or per pixel for ``[N, H, W, classes]`` logits);
  ``m`` holds ``"loss"``, ``"accuracy"`` (the fraction of correct
  predictions) and ``"stats"`` (the layers'
  :class:`lowrank_vjp.CompressionStats`, by module path).

  Args:
    model: The Linen model (or a
      :class:`~lowrank_vjp.training.cached_features.FromBlock`).
    plan: The fine-tuning plan: which layers train, and how they compress.
    tx: The optimizer.
    seed: Seed of the dropout keys (folded with the step).
    image_size: Side of the images for :func:`lowrank_vjp.models.preprocess`;
      None feeds the inputs to ``model.apply`` as they are (cached
      features).
    donate: Donate the state.
    redo_on_overflow: Return the input state unchanged when some layer
      needed more than its capacity (``m["overflow"]``), so that a rank
      controller can recompute the step from it at a grown capacity while
      the state stays donated (:func:`~lowrank_vjp.training.run_step`);
      and always at ``capacities=None`` (the configured capacities, before
      the controller has seen a step): that call is a probe, recomputed at
      the capacities the controller fits to what it measured.
    dtype: Compute dtype (``"bfloat16"``, ``"float16"``; None or
      ``"float32"``: float32). Parameters, optimizer state and running
      averages stay float32; the inputs and every Flax layer compute in
      ``dtype`` (:func:`lowrank_vjp.flax.compute_dtype`), the loss is taken
      on float32 logits, and a float16 step scales its loss
      (:mod:`lowrank_vjp.training.precision`; the state then holds
      ``"loss_scale"``, from :func:`initial_state`).

  Returns:
    The jitted step; ``m`` also holds ``"overflow"`` (``bool[]``: some layer
    kept less than ε) and, with ``redo_on_overflow``, ``"redo"`` (the
    returned state is the input state: on overflow, and on the probe);
    under loss scaling also ``"loss_scale"`` (the scale this step used) and
    ``"skipped"`` (its gradients were not all finite: no update, the scale
    halved).
    ``state`` (see the module docstring) is donated unless ``donate`` is
    False; ``frozen`` holds the variables that are not
    differentiated. ``capacities`` (static: one compile per distinct value)
    is a :meth:`lowrank_vjp.RankController.key`, or None for the configured
    capacities.
  """
  base_key = jax.random.key(seed)
  dtype = precision.compute_dtype(dtype or "float32")
  asi = uses_asi(plan)
  mutable = ["compression", "batch_stats"] + ([lvf.ASI_COLLECTION] if asi
                                              else [])

  def loss_fn(params, batch_stats, asi_state, frozen, x, labels, key,
              capacities, loss_scale):
    trained = {"params": params}
    if batch_stats:
      trained["batch_stats"] = batch_stats
    variables = plan.merge(trained, frozen)
    if asi_state:
      variables[lvf.ASI_COLLECTION] = asi_state
    with (plan.intercept(), lv.rank_capacities(capacities),
          flax_precision.compute_dtype(dtype)):
      logits, state = model.apply(
          variables, precision.cast_input(x, dtype), train=True,
          rngs={"dropout": key}, mutable=mutable)
    logits = precision.loss_logits(logits)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
    new_stats = {}
    if batch_stats:
      new_stats = _like(plan.split({"batch_stats": state["batch_stats"]})[0][
          "batch_stats"], batch_stats)
    new_asi = state.get(lvf.ASI_COLLECTION, {})
    if asi_state:
      new_asi = _like(new_asi, asi_state)
    return precision.scale_loss(loss, loss_scale), (
        loss, logits, new_stats, new_asi, state.get("compression", {}))

  def train_step(state, frozen, images, labels, capacities=None):
    x = (images if image_size is None
         else models.preprocess(images, image_size))
    key = jax.random.fold_in(base_key, state["step"])
    if asi and not state.get("asi_state"):
      raise ValueError("the plan runs ASI: state['asi_state'] must hold its "
                       "factors (from init_asi_state)")
    loss_scale = state.get("loss_scale", {})
    if precision.needs_loss_scale(dtype) and not loss_scale:
      raise ValueError("a float16 step scales its loss: state['loss_scale'] "
                       "must hold the scale (initial_state(..., "
                       "dtype='float16'))")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (loss, logits, batch_stats, asi_state, compression)), grads = grad_fn(
        state["params"], state["batch_stats"], state.get("asi_state", {}),
        frozen, x, labels, key, capacities, loss_scale)
    grads, finite = precision.unscale(grads, loss_scale)
    stats = lvf.collect_stats({"compression": compression})
    overflow = jnp.zeros((), bool)
    for s in stats.values():
      overflow = overflow | jnp.any(s.overflow)

    def updated(state):
      updates, opt_state = tx.update(grads, state["opt_state"],
                                     state["params"])
      new = {
          "step": state["step"] + 1,
          "params": optax.apply_updates(state["params"], updates),
          "batch_stats": batch_stats,
          "opt_state": opt_state,
      }
      if "asi_state" in state:
        new["asi_state"] = asi_state
      if loss_scale:
        new["loss_scale"] = precision.next_loss_scale(loss_scale, finite)
      return new

    def skipped(state):  # float16: some gradient overflowed at this scale
      new = {k: state[k] for k in updated(state)}
      new["step"] = state["step"] + 1
      new["loss_scale"] = precision.next_loss_scale(loss_scale, finite)
      return new

    apply = updated
    if loss_scale:
      apply = lambda state: jax.lax.cond(finite, updated, skipped, state)

    probe = redo_on_overflow and capacities is None
    if probe:
      # The first step of a rank-controlled run: it measures what every
      # layer needs at the configured capacities and is redone at the
      # capacities the controller fits to that, so no update is applied at
      # the configured guess.
      new_state = {k: state[k] for k in updated(state)}
    elif redo_on_overflow:
      # A no-op step, to be redone at a grown capacity. A conditional, not a
      # select: with a select XLA kept a copy of the momentum (36 MiB for a
      # whole ResNet34 step training its last four convolutions) to feed
      # both the select and the parameter update. Where the update is the
      # step's peak XLA still copies the state once (docs/memory.md).
      keep = lambda state: {k: state[k] for k in updated(state)}
      new_state = jax.lax.cond(overflow, keep, apply, state)
    else:
      new_state = apply(state)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "stats": stats,
        "overflow": overflow,
    }
    if redo_on_overflow:  # the state came back unchanged
      metrics["redo"] = jnp.ones((), bool) if probe else overflow
    if loss_scale:
      metrics["loss_scale"] = loss_scale["scale"]
      metrics["skipped"] = ~finite
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,) if donate else (),
                 static_argnames="capacities")


def initial_state(trained, tx: optax.GradientTransformation,
                  asi_state=None, dtype=None) -> dict[str, Any]:
  """The training state of :func:`make_train_step` before the first step.

  Args:
    trained: The trained variables (``plan.split(variables)[0]``).
    tx: The optimizer.
    asi_state: From :func:`init_asi_state` (``{}`` when no layer runs ASI).
    dtype: The step's compute dtype; ``"float16"`` adds the loss scale.

  Returns:
    The state (see the module docstring), at step 0.
  """
  loss_scale = precision.init_loss_scale(
      precision.compute_dtype(dtype or "float32"))
  return ({"loss_scale": loss_scale} if loss_scale else {}) | {
      "step": jnp.zeros((), jnp.int32),
      "params": trained["params"],
      "batch_stats": trained.get("batch_stats", {}),
      "opt_state": tx.init(trained["params"]),
      "asi_state": {} if asi_state is None else asi_state,
  }


def final_variables(plan: lvr.Plan, state, frozen) -> dict:
  """The model's variables after training (for evaluation)."""
  return plan.merge({"params": state["params"],
                     "batch_stats": state["batch_stats"]}, frozen)
