"""A user's own bilinear function as an op: ``fn(lhs, rhs)``.

The decorator form of :func:`lowrank_vjp.compressed_conv` wraps any
function ``fn(x, w)`` that is linear in ``x`` and in ``w``. When it is
exactly one ``lax.conv_general_dilated`` it becomes a
:class:`~lowrank_vjp._src.ops.conv.ConvSpec` (and gets the convolution's
fast paths); otherwise it is a :class:`BilinearSpec`, whose gradients are
the transposes of ``fn`` itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_vjp._src.ops import base


@dataclasses.dataclass(frozen=True)
class BilinearSpec(base.Op):
  """``fn(lhs, rhs)``, bilinear in its arguments (hashable if ``fn`` is).

  ``lhs`` is taken to be batch first and channel last (for methods that ask,
  e.g. the SVD's batch mode or per-channel quantization).

  Attributes:
    fn: The function.
    lhs_shape: Shape of ``lhs``.
    lhs_dtype: Dtype of ``lhs``.
    rhs_shape: Shape of ``rhs``.
    rhs_dtype: Dtype of ``rhs``.
  """

  fn: Callable[[Any, Any], Any]
  lhs_shape: tuple[int, ...]
  lhs_dtype: Any
  rhs_shape: tuple[int, ...]
  rhs_dtype: Any

  def apply(self, lhs, rhs, **unused_overrides) -> jax.Array:
    return self.fn(lhs, rhs)

  def out_dtype(self):
    return jax.eval_shape(
        self.fn, jax.ShapeDtypeStruct(self.lhs_shape, self.lhs_dtype),
        jax.ShapeDtypeStruct(self.rhs_shape, self.rhs_dtype)).dtype


def bilinear_spec(fn: Callable, lhs, rhs) -> BilinearSpec:
  """A :class:`BilinearSpec` of ``fn`` at ``lhs`` and ``rhs``'s types.

  Raises:
    TypeError: for non-floating operands.
  """
  base.check_float("x", lhs)
  base.check_float("w", rhs)
  return BilinearSpec(fn, tuple(np.shape(lhs)), jnp.result_type(lhs),
                      tuple(np.shape(rhs)), jnp.result_type(rhs))
