"""Recomputation baseline: ``jax.checkpoint`` saving nothing inside a layer.

``method="checkpoint"`` runs a layer under ``jax.checkpoint`` with the
``nothing_saveable`` policy: only the layer's inputs are kept (the
activation and the weight), and everything the layer computes is recomputed
in the backward pass. For a single convolution or dense layer that is what
vanilla backprop keeps as well — the gain comes when a whole block
(conv → BatchNorm → activation, …) is wrapped, with :func:`checkpointed`,
so that only the block's input is kept and its intermediates are rebuilt.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax

POLICY = jax.checkpoint_policies.nothing_saveable
"""Save nothing computed inside the checkpointed function."""


def apply(spec, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  """``spec.apply(lhs, rhs)`` under ``jax.checkpoint`` (saves only inputs)."""
  return jax.checkpoint(spec.apply, policy=POLICY)(lhs, rhs)


def residual_nbytes(shape, dtype) -> int:
  """Bytes kept for the layer's activation: the input itself."""
  return math.prod(shape) * jax.numpy.dtype(dtype).itemsize


def checkpointed(fn: Callable | None = None, *, static_argnums=()):
  """Wraps ``fn`` (e.g. a conv → BN → ReLU block) to keep only its inputs.

  ``jax.checkpoint(fn, policy=nothing_saveable)``: in the backward pass the
  block is run again from its inputs; nothing computed inside it is kept.

  Args:
    fn: The block. Omit it to use ``checkpointed`` as a decorator factory.
    static_argnums: As ``jax.checkpoint``.

  Returns:
    The wrapped function.

  Example::

    @lv.checkpointed
    def block(x, w, mean, var, scale, bias):
      y = lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return lv.relu(lv.frozen_batch_norm(y, mean, var, scale, bias))
  """
  if fn is None:
    return functools.partial(checkpointed, static_argnums=static_argnums)
  return jax.checkpoint(fn, policy=POLICY, static_argnums=static_argnums)
