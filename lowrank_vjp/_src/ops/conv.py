"""The convolution op: ``lax.conv_general_dilated`` with arguments resolved.

:func:`conv_spec` validates the arguments of a ``lax.conv_general_dilated``
call (clear errors at trace time) and resolves them into a hashable
:class:`ConvSpec`, the op the custom VJP runs. Its Tucker fast path for the
weight gradient lives in :mod:`conv_tucker`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank_vjp._src.ops import base
from lowrank_vjp._src.ops import conv_tucker


@dataclasses.dataclass(frozen=True)
class ConvSpec(base.Op):
  """A convolution with every argument resolved; hashable, holds no arrays.

  Attributes mirror ``lax.conv_general_dilated``; ``padding`` is always
  explicit ``(low, high)`` pairs, ``dimension_numbers`` a
  ``lax.ConvDimensionNumbers`` of axis indices, and the operand shapes and
  dtypes are recorded so the backward pass can be built without the operands.
  """

  lhs_shape: tuple[int, ...]
  lhs_dtype: Any
  rhs_shape: tuple[int, ...]
  rhs_dtype: Any
  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  dimension_numbers: lax.ConvDimensionNumbers
  feature_group_count: int
  batch_group_count: int
  precision: Any
  preferred_element_type: Any
  out_sharding: Any = None
  lhs_manual: Any = None
  rhs_manual: Any = None

  @property
  def num_spatial(self) -> int:
    return len(self.lhs_shape) - 2

  kind = "conv"

  @property
  def batch_axis(self) -> int:
    return self.dimension_numbers.lhs_spec[0]

  @property
  def channel_axis(self) -> int:
    return self.dimension_numbers.lhs_spec[1]

  def lax_kwargs(self) -> dict[str, Any]:
    """Keyword arguments that reproduce this convolution with ``lax``."""
    kw = dict(window_strides=self.window_strides, padding=self.padding,
              lhs_dilation=self.lhs_dilation, rhs_dilation=self.rhs_dilation,
              dimension_numbers=self.dimension_numbers,
              feature_group_count=self.feature_group_count,
              batch_group_count=self.batch_group_count,
              precision=self.precision,
              preferred_element_type=self.preferred_element_type)
    return kw

  def apply(self, lhs, rhs, **overrides) -> jax.Array:
    """Runs the convolution with ``lax`` (the exact forward pass)."""
    kw = self.lax_kwargs()
    kw.update(overrides)
    if self.out_sharding is not None and "out_sharding" not in overrides:
      kw["out_sharding"] = self.out_sharding
    return lax.conv_general_dilated(lhs, rhs, **kw)

  def weight_grad(self, lhs: jax.Array, g: jax.Array) -> jax.Array:
    """``d rhs`` of the convolution at input ``lhs`` (any batch size)."""
    out_dtype = (self.preferred_element_type
                 if self.preferred_element_type is not None
                 else jnp.result_type(lhs.dtype, self.rhs_dtype))
    return base.transpose(
        lambda r: self.apply(lhs, r, preferred_element_type=out_dtype,
                             out_sharding=None),
        self.rhs_aval(), g.astype(out_dtype))

  def tucker_weight_grad(self, res, g: jax.Array) -> jax.Array:
    """``d rhs`` in the Tucker rank space (:func:`conv_tucker.weight_grad`)."""
    return conv_tucker.weight_grad(self, res, g)


def _int_tuple(name: str, value, length: int, default: int):
  if value is None:
    return (default,) * length
  if isinstance(value, (int, np.integer)):
    value = (value,) * length
  value = tuple(value)
  if len(value) != length or any(
      isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
      for v in value):
    raise ValueError(
        f"{name} must be {length} positive ints (one per spatial dimension); "
        f"got {value!r}.")
  return tuple(int(v) for v in value)


def _hashable(value):
  if isinstance(value, list):
    return tuple(_hashable(v) for v in value)
  return value


def conv_spec(lhs, rhs, window_strides: Sequence[int],
              padding: str | Sequence[tuple[int, int]],
              lhs_dilation: Sequence[int] | None = None,
              rhs_dilation: Sequence[int] | None = None,
              dimension_numbers=None,
              feature_group_count: int = 1,
              batch_group_count: int = 1,
              precision=None,
              preferred_element_type=None,
              out_sharding=None) -> ConvSpec:
  """Validates ``lax.conv_general_dilated`` arguments and resolves them.

  Args: as ``jax.lax.conv_general_dilated``.

  Returns:
    A :class:`ConvSpec`.

  Raises:
    TypeError: for non-floating operands.
    ValueError: for malformed strides, dilations, padding or shapes; the
      message names the argument, the value and what is allowed.
  """
  base.check_float("lhs", lhs)
  base.check_float("rhs", rhs)
  lhs_shape, rhs_shape = tuple(np.shape(lhs)), tuple(np.shape(rhs))
  if len(lhs_shape) != len(rhs_shape) or len(lhs_shape) < 3:
    raise ValueError(
        "lhs and rhs must have the same number of dimensions, at least 3 "
        "(batch, feature and one or more spatial dimensions); got lhs shape "
        f"{lhs_shape} and rhs shape {rhs_shape}.")
  nsp = len(lhs_shape) - 2
  strides = _int_tuple("window_strides", window_strides, nsp, 1)
  lhs_dil = _int_tuple("lhs_dilation", lhs_dilation, nsp, 1)
  rhs_dil = _int_tuple("rhs_dilation", rhs_dilation, nsp, 1)
  for name, count in (("feature_group_count", feature_group_count),
                      ("batch_group_count", batch_group_count)):
    if isinstance(count, bool) or not isinstance(
        count, (int, np.integer)) or count < 1:
      raise ValueError(f"{name} must be a positive int; got {count!r}.")
  try:
    dnums = lax.conv_dimension_numbers(lhs_shape, rhs_shape,
                                       dimension_numbers)
  except Exception as e:  # lax's message says what is wrong with the specs.
    raise ValueError(
        f"dimension_numbers {dimension_numbers!r} do not fit lhs shape "
        f"{lhs_shape} and rhs shape {rhs_shape}: {e}") from e
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
      raise ValueError("padding must be 'SAME', 'VALID', 'SAME_LOWER' or a "
                       f"sequence of (low, high) pairs; got {padding!r}.")
    if any(d != 1 for d in lhs_dil):
      raise ValueError(
          "string padding is not supported with lhs_dilation (as in lax); "
          f"give explicit (low, high) pairs; got padding={padding!r}, "
          f"lhs_dilation={lhs_dil}.")
    kernel = np.take(rhs_shape, dnums.rhs_spec)[2:]
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, rhs_dil)]
    pads = lax.padtype_to_pads(np.take(lhs_shape, dnums.lhs_spec)[2:], eff,
                               strides, padding)
  else:
    try:
      pads = [tuple(int(p) for p in pair) for pair in padding]
      ok = len(pads) == nsp and all(len(p) == 2 for p in pads)
    except (TypeError, ValueError):  # not iterable, or int("a")
      ok = False
    if not ok:
      raise ValueError(
          f"padding must be a string or {nsp} (low, high) int pairs; got "
          f"{padding!r}.")
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  spec = ConvSpec(
      lhs_shape=lhs_shape, lhs_dtype=jnp.result_type(lhs),
      rhs_shape=rhs_shape, rhs_dtype=jnp.result_type(rhs),
      window_strides=strides, padding=pads, lhs_dilation=lhs_dil,
      rhs_dilation=rhs_dil, dimension_numbers=dnums,
      feature_group_count=int(feature_group_count),
      batch_group_count=int(batch_group_count),
      precision=_hashable(precision),
      preferred_element_type=(None if preferred_element_type is None else
                              jnp.dtype(preferred_element_type)),
      out_sharding=out_sharding, lhs_manual=base.manual_axis_type(lhs),
      rhs_manual=base.manual_axis_type(rhs))
  # Let lax check the remaining shape rules (channels vs groups, sizes).
  try:
    jax.eval_shape(lambda l, r: spec.apply(l, r, out_sharding=None),
                   jax.ShapeDtypeStruct(lhs_shape, spec.lhs_dtype),
                   jax.ShapeDtypeStruct(rhs_shape, spec.rhs_dtype))
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"lhs shape {lhs_shape} and rhs shape {rhs_shape} do not form a valid "
        f"convolution with these arguments: {e}") from e
  return spec
