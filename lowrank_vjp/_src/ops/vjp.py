"""The one custom VJP every compressed op runs through.

``compressed_apply(op, method, lhs, rhs, state)`` returns the op's exact
output, the method's statistics and its new state. Its VJP saves what the
method's ``compress_for`` returned and ``rhs`` — never ``lhs`` — and its
backward pass is the method's ``input_grad`` (the op's exact transpose by
default) and ``weight_grad`` (the op's transpose at the decompressed input by
default, or a fast path). The op owns the maths of the contraction, the
method owns what is saved; neither knows the other's type.

Two orders are pinned (:mod:`lowrank_vjp._src.schedule`): the forward pass
computes the residual before the op's output (the compression's transients
are freed before the output exists), and the backward pass computes the
weight gradient before the input gradient (the cotangent dies at the
transposed op instead of being kept beside the input gradient). On a
9-block ResNet-style CNN trained whole at batch 64 they took the HOSVD
step's estimated peak from 172.2 to 154.6 MiB (vanilla: 489.9) and lowered
every other compressing method's. Not every program gains: gradient
filtering's step rose on MobileNetV2 trained whole (214.4 → 223.9 MiB), and
a GPT-style step with HOSVD dense layers beside ``jax.nn.gelu`` and plain
attention (which keep full-size inputs of their own) peaks 5.0 MiB higher
with the forward order (247.7 → 252.7 MiB); with the library's own GELU,
attention and LayerNorm it peaks lower (docs/memory.md).

The backward pass reads ``g`` through :func:`schedule.computed_once`, so
that XLA builds the output gradient once for both gradients: where ``g`` is
a cheap elementwise product (the next layer's input gradient times a ReLU6
mask and a frozen BatchNorm scale) XLA had built it once per shape it is
read in and kept the next layer's input gradient alive for all of them. On
MobileNetV2 trained whole at 224 px that took HOSVD's estimated whole-step
peak from 561.8 to 407.1 MiB at batch 32 (vanilla: 941.0).

Higher-order differentiation is refused: the residual is computed from
``lhs`` without derivatives, so differentiating the backward pass in ``lhs``
(a Hessian in the inputs, a meta-gradient through an inner SGD step) would
silently miss terms. :func:`first_order_only` raises instead. Derivatives
that do not pass through a residual (e.g. a Hessian in the weights of a
single layer whose input is data) are still allowed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lowrank_vjp._src import remat
from lowrank_vjp._src import schedule
from lowrank_vjp._src.ops import base


class HigherOrderError(TypeError):
  """Raised when a compressed op is differentiated more than once in lhs."""


@jax.custom_jvp
def first_order_only(x: jax.Array) -> jax.Array:
  """Identity whose derivative raises :class:`HigherOrderError`.

  Applied to the activation a method compresses, inside the forward rule:
  first-order differentiation never differentiates that rule, higher-order
  differentiation does.
  """
  return x


@first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
  del primals, tangents
  raise HigherOrderError(
      "lowrank_vjp: second-order differentiation through a compressed layer "
      "is not supported (its saved residual is not differentiable in the "
      "layer input, so the result would be wrong). Use method='none' (or "
      "lowrank_vjp.methods.Vanilla()) for the layers you differentiate "
      "twice, e.g. in MAML's inner step or a Hessian in the inputs.")


def _stop(x):
  """``x`` with no derivative: a JVP through it raises (see module)."""
  return jax.lax.stop_gradient(first_order_only(x))


def _pin_through_weight(op) -> bool:
  """Whether the order pins below may pass through ``rhs``.

  A pin is a select over ``rhs`` that XLA materializes before the op: a copy
  of the weight, alive only until the op has run. It is worth it when the
  weight is no larger than the op's output, the buffer it keeps from
  overlapping (always for convolutions; not for a dense layer applied to
  fewer tokens than it has inputs).
  """
  rhs = math.prod(op.rhs_shape) * jnp.dtype(op.rhs_dtype).itemsize
  out = math.prod(op.out_shape()) * jnp.dtype(op.out_dtype()).itemsize
  return rhs <= out


_OP_FIRST_RATIO = 3


def _op_first(op) -> bool:
  """Whether the op runs before the compression of its input.

  Where the output is at most a third of the input (a stride-2 depthwise
  convolution's is a quarter, an inverted residual's projection a sixth),
  the op runs first: its input's last reader is then the compression,
  whose scaled copy XLA writes over the input, and the small output is all
  that is added. Otherwise the residual comes first (the pins below), which
  is better where the input outlives the op anyway, as a residual block's
  input does for its skip addition; ResNet's stride-2 convolutions, whose
  outputs are half their inputs, are among these.
  """
  lhs = math.prod(op.lhs_shape) * jnp.dtype(op.lhs_dtype).itemsize
  out = math.prod(op.out_shape()) * jnp.dtype(op.out_dtype()).itemsize
  return out * _OP_FIRST_RATIO <= lhs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def compressed_apply(op, method, lhs, rhs, state):
  """``(op.apply(lhs, rhs), stats, new_state)`` saving a compressed ``lhs``.

  Args:
    op: A hashable op (:class:`lowrank_vjp._src.ops.base.Op`).
    method: A hashable :class:`lowrank_vjp.methods.Method`.
    lhs: The activation.
    rhs: The weight.
    state: The method's state (None for stateless methods); not
      differentiated.

  Returns:
    ``(y, stats, new_state)``.
  """
  _, stats, new_state = method.compress_for(op, _stop(lhs), state)
  return op.apply(lhs, rhs), stats, new_state


def _compressed_apply_fwd(op, method, lhs, rhs, state):
  res, stats, new_state = method.compress_for(op, _stop(lhs), state)
  res = remat.named(res)
  if _pin_through_weight(op) and not _op_first(op):
    # The residual before the op itself: XLA then frees the compression's
    # transients (a scaled copy of lhs) before it allocates the output.
    y = op.apply(lhs, schedule.tie(rhs, res))
  else:
    # The residual before the output's first use only. Where the op should
    # run first (_op_first), nothing more is needed: XLA schedules it
    # before the compression once no pin ties it after (ordering it
    # explicitly, by a select over ``lhs`` that reads the output, cost a
    # copy of ``lhs``).
    y = schedule.tie(op.apply(lhs, rhs), res)
  return (y, stats, new_state), (res, remat.named(rhs))


def _compressed_apply_bwd(op, method, saved, cotangents):
  res, rhs = saved
  g = cotangents[0]  # statistics and state carry no gradient
  # What the method's two gradients read of g (g itself, or e.g. its
  # average over gradient filtering's patches).
  g = method.cotangent(op, g)
  # One g for both gradients. Where g comes from cheap elementwise work (the
  # next layer's input gradient times a ReLU mask and a BatchNorm scale),
  # XLA otherwise computed that work once for each shape g is read in (the
  # transposed op reads it whole, the weight gradient's contraction as a
  # matrix) and kept the next layer's input gradient alive for both:
  # MobileNetV2's first expansion held three activation-sized buffers in
  # its backward pass instead of one.
  g = schedule.computed_once(g)
  drhs = method.weight_grad(op, res, g)
  # Then the input gradient from a weight pinned after the weight gradient:
  # the weight gradient's last read of ``g`` then precedes the input
  # gradient, so ``g`` dies at the transposed op instead of being kept, at
  # full size, beside ``dlhs`` and whatever consumes it next. Otherwise the
  # weight (a flipped kernel) is pinned after ``g``, so that its transform
  # is not hoisted into the forward pass.
  rhs = (schedule.tie(rhs, drhs) if _pin_through_weight(op)
         else schedule.after(rhs, g))
  dlhs = method.input_grad(op, res, rhs, g)
  # Inside a user's shard_map: each cotangent with its operand's type.
  dlhs = base.match_varying(dlhs.astype(op.lhs_dtype), op.lhs_manual)
  drhs = base.match_varying(drhs.astype(op.rhs_dtype), op.rhs_manual)
  return dlhs, drhs, None


compressed_apply.defvjp(_compressed_apply_fwd, _compressed_apply_bwd)
