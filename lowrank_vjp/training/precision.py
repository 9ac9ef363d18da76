"""Mixed-precision training: the compute dtype and dynamic loss scaling.

``--dtype bfloat16`` (or ``float16``) keeps the parameters, the optimizer
state and the BatchNorm running averages in float32 and computes the
forward and backward passes in the narrower dtype
(:func:`lowrank_vjp.flax.compute_dtype`; NNX: :func:`set_compute_dtype`).
The loss is taken on float32 logits.

float16's smallest normal number is 6.1e-5, so small gradients flush to
zero: a float16 step multiplies the loss by a scale before differentiating
and divides the gradients by it, and the scale adapts (the scheme of
Micikevicius et al., "Mixed Precision Training", ICLR 2018): a step whose
gradients are not all finite is skipped (parameters and optimizer state
unchanged) and halves the scale; :data:`PERIOD` finite steps in a row double
it. bfloat16 has float32's range and needs no scale.

The scale is a pytree carried in the training state (``state["loss_scale"]``,
``{}`` when not scaling), so it is donated, checkpointed and resumed like the
rest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowrank_vjp._src.flax.precision import canonical_dtype

#: First loss scale of a float16 run.
INITIAL_SCALE = 2.0 ** 15
#: Finite steps in a row after which the scale doubles.
PERIOD = 2000
#: Smallest scale (halving stops here).
MIN_SCALE = 1.0


def compute_dtype(name: str) -> jnp.dtype | None:
  """The compute dtype of a config's ``dtype`` (None for float32)."""
  dtype = canonical_dtype(name, "dtype")
  return None if dtype == jnp.float32 else dtype


def cast_input(x: jax.Array, dtype) -> jax.Array:
  """A floating model input in the compute ``dtype`` (tokens unchanged)."""
  if dtype is None or not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  return x.astype(dtype)


def loss_logits(logits: jax.Array) -> jax.Array:
  """``logits`` widened to at least float32, for the loss."""
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def needs_loss_scale(dtype) -> bool:
  """Whether a run computing in ``dtype`` scales its loss (float16)."""
  return dtype is not None and jnp.dtype(dtype) == jnp.float16


def init_loss_scale(dtype) -> dict:
  """``state["loss_scale"]`` before the first step (``{}``: no scaling)."""
  if not needs_loss_scale(dtype):
    return {}
  return {"scale": jnp.asarray(INITIAL_SCALE, jnp.float32),
          "good_steps": jnp.zeros((), jnp.int32)}


def scale_loss(loss: jax.Array, loss_scale: dict) -> jax.Array:
  """``loss`` times the scale (the loss itself when not scaling)."""
  if not loss_scale:
    return loss
  return loss * loss_scale["scale"].astype(loss.dtype)


def unscale(grads, loss_scale: dict):
  """``(grads / scale, all finite)``; ``(grads, True)`` when not scaling.

  The finiteness check is over every leaf, so one overflow anywhere skips
  the step.
  """
  if not loss_scale:
    return grads, jnp.ones((), bool)
  inv = 1.0 / loss_scale["scale"]
  grads = jax.tree.map(lambda g: g * inv.astype(g.dtype), grads)
  finite = jnp.ones((), bool)
  for g in jax.tree.leaves(grads):
    finite = finite & jnp.all(jnp.isfinite(g))
  return grads, finite


def next_loss_scale(loss_scale: dict, finite: jax.Array) -> dict:
  """The scale after a step whose gradients were (not) all ``finite``."""
  if not loss_scale:
    return {}
  scale, good = loss_scale["scale"], loss_scale["good_steps"] + 1
  grow = finite & (good >= PERIOD)
  new_scale = jnp.where(
      finite, jnp.where(grow, scale * 2.0, scale),
      jnp.maximum(scale * 0.5, MIN_SCALE))
  return {"scale": new_scale.astype(jnp.float32),
          "good_steps": jnp.where(finite & ~grow, good, 0).astype(jnp.int32)}
