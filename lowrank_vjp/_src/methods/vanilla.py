"""Vanilla backprop: the layer saves its input as it is (the baseline)."""

from __future__ import annotations

import dataclasses

from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src.methods import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class Vanilla(base.Method):
  """No compression: the op is ``lax``'s own, with JAX's own VJP.

  Shorthands ``"none"`` and ``"vanilla"``.

  Example::

    conv = lv.compressed_conv(method=lv.methods.Vanilla())
  """

  name = "none"
  aliases = ("vanilla",)
  per_shard = False

  def apply(self, op, lhs, rhs, state=None):
    return op.apply(lhs, rhs), stats_lib.uncompressed(
        op.lhs_shape, op.lhs_dtype, self.label), state
