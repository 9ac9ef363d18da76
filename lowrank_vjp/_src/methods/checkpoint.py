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

import dataclasses
import functools
import math
from collections.abc import Callable

import jax

from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src.methods import base

POLICY = jax.checkpoint_policies.nothing_saveable
"""Save nothing computed inside the checkpointed function."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Checkpoint(base.Method):
  """Recompute the layer in the backward pass from its saved inputs.

  The layer runs under ``jax.checkpoint`` with :data:`POLICY`; for a single
  layer that keeps what vanilla keeps (the input). It is the recomputation
  baseline of the tables; wrap whole blocks with :func:`checkpointed`.

  Example::

    conv = lv.compressed_conv(method=lv.methods.Checkpoint())
  """

  name = "checkpoint"

  def apply(self, op, lhs, rhs, state=None):
    y = jax.checkpoint(op.apply, policy=POLICY)(lhs, rhs)
    return y, stats_lib.uncompressed(op.lhs_shape, op.lhs_dtype,
                                     self.label), state


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
