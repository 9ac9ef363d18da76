"""Gradient filter: the activation saved summed over patches (``"gradfilter"``).

After Yang, Li and Marculescu, *Efficient On-device Training via Gradient
Filtering*, CVPR 2023 (code: ``SLDGroup/GradientFilter-CVPR23``,
``custom_op/conv_avg.py``, whose ``Conv2dAvgOp`` semantics this follows).

The output gradient ``g`` is taken as constant over ``r × r`` patches of the
output grid (``r`` = ``radius``). Per spatial axis with input size ``X``,
output size ``O`` and stride ``s``:

* ``P = ceil(O / r)`` patches; input patch ``p`` covers input positions
  ``[p·R - pad, (p + 1)·R - pad)`` with ``R = r·s`` and
  ``pad = ceil((P·R - X) / 2)``;
* output patch ``p`` covers outputs ``[p·r - gpad, (p + 1)·r - gpad)`` with
  ``gpad = ceil((P·r - O) / 2)``.

Forward: the exact convolution; saved: ``x_sum``, the input summed over each
input patch (``[N, C, P…]`` in the input's layout, zero padding), and the
kernel (a parameter, alive anyway). Backward, with ``ḡ`` the output gradient
averaged over each output patch (over its positions inside the output) and
``W̄[o, i] = Σ_k W[o, i, k]`` the kernel summed over its window:

* ``dW[o, i, k] = Σ_{n, p} ḡ[n, o, p] · x_sum[n, i, p]`` for every tap
  ``k`` (shared across kernel positions);
* ``dx[n, i, x] = Σ_o W̄[o, i] · ḡ[n, o, p(x)]``: constant over each input
  patch, zero outside every patch.

Both gradients are approximate; the input gradient's error travels down the
network (unlike the Tucker methods, whose input gradient is exact). As in the
reference code there is no ``1/s²`` correction for strided convolutions
(``x_sum`` sums ``(r·s)²`` inputs). Grouped convolutions use the weights of
each group (the reference handles only ``groups = 1`` and depthwise with one
output per channel; both are special cases).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src.methods import base
from lowrank_vjp._src.ops import conv as conv_lib

ConvSpec = conv_lib.ConvSpec


@dataclasses.dataclass(frozen=True)
class FilterGrid:
  """The patch grid of one convolution (hashable, per spatial axis).

  Attributes:
    radius: ``r``.
    in_sizes: ``X`` per spatial axis.
    out_sizes: ``O`` per spatial axis.
    strides: ``s`` per spatial axis.
    patches: ``P = ceil(O / r)``.
    in_pads: ``pad = ceil((P·r·s - X) / 2)`` (negative: the grid starts
      inside the input).
    out_pads: ``gpad = ceil((P·r - O) / 2)``.
  """

  radius: int
  in_sizes: tuple[int, ...]
  out_sizes: tuple[int, ...]
  strides: tuple[int, ...]
  patches: tuple[int, ...]
  in_pads: tuple[int, ...]
  out_pads: tuple[int, ...]

  @property
  def in_windows(self) -> tuple[int, ...]:
    """``R = r·s`` per spatial axis."""
    return tuple(self.radius * s for s in self.strides)


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def check_supported(spec: ConvSpec, radius: int) -> None:
  """Raises ``ValueError`` for convolutions the gradient filter can't take."""
  if any(d != 1 for d in spec.lhs_dilation):
    raise ValueError(
        "method='gradfilter' does not support lhs_dilation (transposed "
        f"convolutions); got lhs_dilation={spec.lhs_dilation}.")
  if spec.batch_group_count != 1:
    raise ValueError("method='gradfilter' needs batch_group_count=1; got "
                     f"{spec.batch_group_count}.")
  if radius > 1 and any(d >= radius for d in spec.rhs_dilation):
    raise ValueError(
        "method='gradfilter' supports rhs_dilation smaller than the radius "
        f"only (the reference switches to another operator there); got "
        f"rhs_dilation={spec.rhs_dilation}, radius={radius}.")


def filter_grid(spec: ConvSpec, radius: int) -> FilterGrid:
  """The patch grid of ``spec`` for ``radius``."""
  dn = spec.dimension_numbers
  out = spec.out_shape()
  in_sizes = tuple(spec.lhs_shape[a] for a in dn.lhs_spec[2:])
  out_sizes = tuple(out[a] for a in dn.out_spec[2:])
  patches = tuple(_ceil_div(o, radius) for o in out_sizes)
  in_pads = tuple(_ceil_div(p * radius * s - x, 2) for p, s, x in zip(
      patches, spec.window_strides, in_sizes, strict=True))
  out_pads = tuple(_ceil_div(p * radius - o, 2)
                   for p, o in zip(patches, out_sizes, strict=True))
  return FilterGrid(radius, in_sizes, out_sizes, spec.window_strides,
                    patches, in_pads, out_pads)


def residual_nbytes(spec: ConvSpec, radius: int) -> int:
  """Bytes of ``x_sum``: ``N · C · Π P · itemsize``."""
  dn = spec.dimension_numbers
  grid = filter_grid(spec, radius)
  return (spec.lhs_shape[dn.lhs_spec[0]] * spec.lhs_shape[dn.lhs_spec[1]]
          * math.prod(grid.patches) * jnp.dtype(spec.lhs_dtype).itemsize)


def _patch_sum(x: jax.Array, axes, sizes, windows, pads, patches):
  """Sums ``x`` over patches along ``axes`` (zero padding, a reduction)."""
  config = [(0, 0, 0)] * x.ndim
  for a, n, w, lo, p in zip(axes, sizes, windows, pads, patches, strict=True):
    config[a] = (lo, p * w - n - lo, 0)
  x = lax.pad(x, jnp.zeros((), x.dtype), config)
  shape, reduce = [], []
  for a, n in enumerate(x.shape):
    if a in axes:
      w = windows[list(axes).index(a)]
      shape += [n // w, w]
      reduce.append(len(shape) - 1)
    else:
      shape.append(n)
  return jnp.sum(x.reshape(shape), axis=tuple(reduce))


def pool_input(x: jax.Array, spec: ConvSpec, grid: FilterGrid) -> jax.Array:
  """``x_sum``: ``x`` summed over each input patch, in ``x``'s layout."""
  ct = jnp.promote_types(x.dtype, jnp.float32)
  axes = spec.dimension_numbers.lhs_spec[2:]
  pooled = _patch_sum(x.astype(ct), axes, grid.in_sizes, grid.in_windows,
                      grid.in_pads, grid.patches)
  # The patches may leave border positions out; a NaN or inf there must
  # still reach the weight gradient, as it does in exact backprop (a flag,
  # not 0 · Σx, which overflows for large finite inputs).
  carried = jnp.where(jnp.all(jnp.isfinite(x)), 0.0, jnp.nan).astype(ct)
  return (pooled + carried).astype(x.dtype)


def _patch_counts(size: int, window: int, pad: int, patches: int):
  """How many real positions each patch of one axis covers."""
  pos = np.arange(patches * window) - pad
  valid = ((pos >= 0) & (pos < size)).reshape(patches, window)
  return valid.sum(axis=1)


def pool_output_grad(g: jax.Array, spec: ConvSpec,
                     grid: FilterGrid) -> jax.Array:
  """``ḡ``: ``g`` averaged over each output patch, canonical ``[N, O, P…]``."""
  dn = spec.dimension_numbers
  ct = jnp.promote_types(g.dtype, jnp.float32)
  g = jnp.transpose(g.astype(ct), dn.out_spec)
  nsp = spec.num_spatial
  axes = tuple(range(2, 2 + nsp))
  windows = (grid.radius,) * nsp
  total = _patch_sum(g, axes, grid.out_sizes, windows, grid.out_pads,
                     grid.patches)
  count = functools.reduce(
      np.multiply.outer,
      [_patch_counts(o, grid.radius, p, n) for o, p, n in zip(
          grid.out_sizes, grid.out_pads, grid.patches, strict=True)])
  return total / jnp.asarray(np.maximum(count, 1), ct)


def _canonical_rhs(rhs: jax.Array, spec: ConvSpec) -> jax.Array:
  return jnp.transpose(rhs, spec.dimension_numbers.rhs_spec)


def weight_grad(spec: ConvSpec, x_sum: jax.Array, g_avg: jax.Array
                ) -> jax.Array:
  """``dW``: ``Σ ḡ · x_sum`` per (out, in) channel, at every kernel tap."""
  dn = spec.dimension_numbers
  groups = spec.feature_group_count
  x = jnp.transpose(x_sum.astype(g_avg.dtype), dn.lhs_spec)  # [N, C, P...]
  n, c = x.shape[:2]
  o = g_avg.shape[1]
  x = x.reshape((n, groups, c // groups, -1))
  gy = g_avg.reshape((n, groups, o // groups, -1))
  dw = jnp.einsum("ngop,ngip->goi", gy, x, precision=spec.precision)
  dw = dw.reshape(o, c // groups)
  kernel = tuple(spec.rhs_shape[a] for a in dn.rhs_spec[2:])
  dw = jnp.broadcast_to(dw.reshape(dw.shape + (1,) * len(kernel)),
                        dw.shape + kernel)
  return jnp.transpose(dw, np.argsort(dn.rhs_spec)).astype(spec.rhs_dtype)


def input_grad(spec: ConvSpec, rhs: jax.Array, g_avg: jax.Array,
               grid: FilterGrid) -> jax.Array:
  """``dx``: ``W̄ᵀ ḡ`` spread over each input patch, in ``lhs``'s layout."""
  dn = spec.dimension_numbers
  groups = spec.feature_group_count
  w_sum = jnp.sum(_canonical_rhs(rhs, spec).astype(g_avg.dtype),
                  axis=tuple(range(2, rhs.ndim)))  # [O, C/groups]
  n, o = g_avg.shape[:2]
  patches = g_avg.shape[2:]
  cg = w_sum.shape[1]
  gy = g_avg.reshape((n, groups, o // groups) + patches)
  ws = w_sum.reshape(groups, o // groups, cg)
  gx = jnp.einsum("ngo...,goi->ngi...", gy, ws, precision=spec.precision)
  gx = gx.reshape((n, groups * cg) + patches)
  # Spread each patch value over its R positions, then crop/pad to X.
  for d, (p, w) in enumerate(zip(patches, grid.in_windows, strict=True)):
    gx = jnp.repeat(gx, w, axis=2 + d, total_repeat_length=p * w)
  config = [(0, 0, 0), (0, 0, 0)] + [
      (-lo, x - (p * w - lo), 0) for x, p, w, lo in zip(
          grid.in_sizes, patches, grid.in_windows, grid.in_pads, strict=True)]
  gx = lax.pad(gx, jnp.zeros((), gx.dtype), config)
  return jnp.transpose(gx, np.argsort(dn.lhs_spec)).astype(spec.lhs_dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradFilter(base.Method):
  """Gradient filtering: ``g`` taken constant over ``r × r`` output patches.

  Saves ``x_sum``, the input summed over each input patch
  (:func:`residual_nbytes` bytes). Both gradients are approximate (see the
  module docstring). Convolutions only.

  Attributes:
    radius: Patch size ``r`` of the output gradient (an int >= 1; the paper
      uses 2 and 4).

  Example::

    conv = lv.compressed_conv(method=lv.methods.GradFilter(radius=2))
  """

  name = "gradfilter"

  radius: int = 2

  def __post_init__(self):
    base.set_field(self, "radius", base.integer(
        "radius", self.radius, "gradfilter (the gradient filter's patch "
        "size, e.g. 2 or 4)"))

  def check_op(self, op) -> None:
    if op.kind != "conv":
      raise ValueError(
          "method='gradfilter' applies to convolutions only: it pools over "
          f"the convolution's output grid, and this op is a {op.kind} (for a "
          "decorated function it must be exactly one "
          "lax.conv_general_dilated of (x, w)). Use compressed_conv, or "
          "another method for this layer.")
    check_supported(op, self.radius)

  def compress_for(self, op, x, state):
    grid = filter_grid(op, self.radius)
    x_sum = pool_input(x, op, grid)
    return x_sum, stats_lib.uncompressed(
        x.shape, x.dtype, self.label, residual_nbytes(op, self.radius)), state

  def cotangent(self, op, g):
    # Both gradients read only the patch averages of g.
    return pool_output_grad(g, op, filter_grid(op, self.radius))

  def input_grad(self, op, residual, rhs, g_avg):
    return input_grad(op, rhs, g_avg, filter_grid(op, self.radius))

  def weight_grad(self, op, residual, g_avg):
    return weight_grad(op, residual, g_avg)
