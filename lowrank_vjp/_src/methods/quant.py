"""Approximate activations: K-bit codes of the saved input (``"quant"``).

After Chakrabarti and Moseley, *Backprop with Approximate Activations for
Memory-efficient Network Training*, NeurIPS 2019 (code: ``ayanc/blpa``).
The forward pass is exact and in full precision; what is saved for the
backward pass is a ``bits``-bit code per element, packed into ``uint32``
words (:mod:`packing`).

Two forms:

* :func:`apply` (``compressed_conv(method="quant")`` and
  ``compressed_dense(method="quant")``): the layer's input ``x`` coded over
  ``[max(μ - 3σ, min x), min(μ + 3σ, max x)]``, per layer or per channel, in
  ``2**bits`` equal bins, decoded to the bin midpoints. The weight gradient
  is that of the layer at the decoded input; the input gradient is exact.
* :func:`bn_relu_conv`: the fused BatchNorm → ReLU → convolution unit of the
  paper, whose only full-resolution residual is the codes of the
  BatchNorm-normalised value. The bins are ``6 / 2**bits`` wide in units of
  the batch standard deviation and placed so that ReLU's threshold is a bin
  edge: the ReLU mask is read off the codes exactly; the BatchNorm backward
  and the weight gradient use the decoded values.

Stochastic rounding (``stochastic=True``) adds to each element, before
flooring, a uniform number drawn by a counter-based hash of the element's
position and bits; the decoded value is then unbiased inside the range. It
needs no key and is fixed for a given input.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank_vjp._src.ops import conv_tucker as conv_rule
from lowrank_vjp._src.ops import conv as conv_spec_lib
from lowrank_vjp._src.ops import dot as dense_rule
from lowrank_vjp._src.tensor import packing as packing
from lowrank_vjp._src.tensor import tucker as residuals

RANGE_SIGMAS = 3.0
"""Half-width of the coded range, in standard deviations."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How :func:`apply` codes its input (hashable).

  Attributes:
    bits: 2, 4 or 8.
    per_channel: One range per channel (along ``channel_axis``).
    stochastic: Stochastic instead of nearest rounding.
    channel_axis: The input's channel axis (used when ``per_channel``).
  """

  bits: int
  per_channel: bool
  stochastic: bool
  channel_axis: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantResidual:
  """Packed codes of an activation and how to decode them.

  ``x ≈ lo + (code + 0.5) · step`` (``lo`` and ``step`` broadcast along the
  channel axis when per channel).

  Saved bytes: ``4 · ceil(size · bits / 32) + 2 · 4 · (C or 1)``.

  Attributes:
    words: ``uint32[ceil(size · bits / 32)]``, the packed codes.
    lo: ``float32[]`` or ``float32[C]``, the bottom of the range.
    step: Same shape, the bin width.
  """

  words: jax.Array
  lo: jax.Array
  step: jax.Array

  @property
  def nbytes(self) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
               for a in (self.words, self.lo, self.step))


def residual_nbytes(shape, qspec: QuantSpec) -> int:
  """Bytes of the :class:`QuantResidual` of an activation of ``shape``."""
  ranges = shape[qspec.channel_axis] if qspec.per_channel else 1
  return packing.packed_nbytes(math.prod(shape), qspec.bits) + 8 * ranges


def _uniform(x: jax.Array) -> jax.Array:
  """Per-element numbers in ``[0, 1)`` from a hash of position and bits."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  index = lax.iota(jnp.uint32, x.size).reshape(x.shape)
  h = bits ^ (index * jnp.uint32(0x9E3779B9)) ^ jnp.uint32(0x5BD1E995)
  for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
    h = (h ^ (h >> jnp.uint32(shift))) * jnp.uint32(mult)
  h = h ^ (h >> jnp.uint32(16))
  return (h >> jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)


def _codes(t: jax.Array, bits: int, stochastic: bool,
           source: jax.Array) -> jax.Array:
  """Bin index of ``t`` (in bin units from the range's bottom), clipped."""
  if stochastic:
    t = t - 0.5 + _uniform(source)
  top = float(2**bits - 1)
  return jnp.clip(jnp.floor(t), 0.0, top).astype(jnp.uint32)


def _reduce_axes(ndim: int, qspec: QuantSpec):
  if qspec.per_channel:
    return tuple(a for a in range(ndim) if a != qspec.channel_axis)
  return tuple(range(ndim))


def _broadcast(v: jax.Array, ndim: int, qspec: QuantSpec) -> jax.Array:
  if not qspec.per_channel:
    return v
  shape = [1] * ndim
  shape[qspec.channel_axis] = v.shape[0]
  return v.reshape(shape)


def quantize(x: jax.Array, qspec: QuantSpec) -> QuantResidual:
  """Codes ``x`` over about ``±3σ`` around its mean (see module docstring)."""
  x = lax.stop_gradient(x)
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = _reduce_axes(x.ndim, qspec)
  mean = jnp.mean(xf, axis=axes)
  std = jnp.sqrt(jnp.mean(jnp.square(xf - _broadcast(mean, x.ndim, qspec)),
                          axis=axes))
  lo = jnp.maximum(mean - RANGE_SIGMAS * std, jnp.min(xf, axis=axes))
  hi = jnp.minimum(mean + RANGE_SIGMAS * std, jnp.max(xf, axis=axes))
  step = (hi - lo) / 2**qspec.bits
  step = jnp.maximum(step, jnp.finfo(step.dtype).tiny)
  t = (xf - _broadcast(lo, x.ndim, qspec)) / _broadcast(step, x.ndim, qspec)
  codes = _codes(t, qspec.bits, qspec.stochastic, x)
  return QuantResidual(packing.pack(codes, qspec.bits),
                       lo.astype(jnp.float32), step.astype(jnp.float32))


def dequantize(res: QuantResidual, shape, dtype, qspec: QuantSpec
               ) -> jax.Array:
  """The bin midpoints ``lo + (code + 0.5) · step`` as ``dtype[shape]``."""
  codes = packing.unpack(res.words, qspec.bits, shape).astype(jnp.float32)
  ndim = len(shape)
  x = (_broadcast(res.lo, ndim, qspec)
       + (codes + 0.5) * _broadcast(res.step, ndim, qspec))
  return x.astype(dtype)


# ------------------------------------------------------ layer drop-in ---


@dataclasses.dataclass(frozen=True)
class BilinearSpec:
  """An arbitrary ``fn(lhs, rhs)`` bilinear in its arguments (hashable).

  Lets the decorator form of ``compressed_conv`` run :func:`apply` on any
  bilinear function; both gradients are transposes of ``fn``.
  """

  fn: Any
  lhs_shape: tuple[int, ...]
  lhs_dtype: Any
  rhs_shape: tuple[int, ...]
  rhs_dtype: Any

  def apply(self, lhs, rhs, **unused_overrides):
    return self.fn(lhs, rhs)


def input_transpose(spec, rhs, g):
  """Exact ``d lhs`` of the layer (needs only ``rhs``)."""
  if isinstance(spec, conv_spec_lib.ConvSpec):
    return conv_rule.input_grad(spec, rhs, g)
  if isinstance(spec, dense_rule.DotSpec):
    return dense_rule.input_grad(spec, rhs, g)
  rhs = residuals.after(rhs, g)
  lhs_aval = jax.ShapeDtypeStruct(spec.lhs_shape, spec.lhs_dtype)
  return jax.linear_transpose(lambda lhs: spec.fn(lhs, rhs), lhs_aval)(g)[0]


def weight_transpose(spec, lhs_hat, g):
  """``d rhs`` of the layer at the rebuilt input ``lhs_hat``."""
  stand_in = residuals.TuckerResidual(lhs_hat, (None,) * lhs_hat.ndim)
  if isinstance(spec, conv_spec_lib.ConvSpec):
    return conv_rule.weight_grad_reference(spec, stand_in, g)
  if isinstance(spec, dense_rule.DotSpec):
    return dense_rule.weight_grad_reference(spec, stand_in, g)
  rhs_aval = jax.ShapeDtypeStruct(spec.rhs_shape, spec.rhs_dtype)
  return jax.linear_transpose(lambda r: spec.fn(lhs_hat, r), rhs_aval)(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def apply(spec, qspec: QuantSpec, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  """``spec.apply(lhs, rhs)`` saving ``bits``-bit codes of ``lhs``.

  Args:
    spec: A ``ConvSpec``, ``DotSpec`` or :class:`BilinearSpec`.
    qspec: How to code ``lhs``.
    lhs: The activation.
    rhs: The weight.

  Returns:
    The exact output. Its VJP saves a :class:`QuantResidual`
    (:func:`residual_nbytes`) and ``rhs``.
  """
  del qspec
  return spec.apply(lhs, rhs)


def _apply_fwd(spec, qspec, lhs, rhs):
  res = quantize(lhs, qspec)
  return residuals.tie(spec.apply(lhs, rhs), res), (res, rhs)


def _apply_bwd(spec, qspec, saved, g):
  res, rhs = saved
  res = QuantResidual(residuals.after(res.words, g), res.lo, res.step)
  lhs_hat = dequantize(res, spec.lhs_shape, spec.lhs_dtype, qspec)
  return input_transpose(spec, rhs, g), weight_transpose(spec, lhs_hat, g)


apply.defvjp(_apply_fwd, _apply_bwd)


# --------------------------------------------- fused BN → ReLU → conv ---


def _bin_width(bits: int) -> float:
  """Bin width of the fused block, in batch standard deviations."""
  return 2 * RANGE_SIGMAS / 2**bits


def _abs_scale(scale: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.abs(scale), jnp.finfo(scale.dtype).tiny)


def _shift(bias: jax.Array, abs_scale: jax.Array, bits: int) -> jax.Array:
  """Code of the first bin above ReLU's threshold, in ``[1, 2**bits - 1]``."""
  start = 2 ** (bits - 1) - jnp.floor(bias / abs_scale / _bin_width(bits))
  return jnp.clip(start, 1, 2**bits - 1)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static settings of :func:`bn_relu_conv` (hashable)."""

  conv: conv_spec_lib.ConvSpec
  bits: int
  stochastic: bool
  epsilon: float


def _channel_shape(spec: conv_spec_lib.ConvSpec):
  shape = [1] * len(spec.lhs_shape)
  c = spec.dimension_numbers.lhs_spec[1]
  shape[c] = spec.lhs_shape[c]
  return tuple(shape)


def _stat_axes(spec: conv_spec_lib.ConvSpec):
  c = spec.dimension_numbers.lhs_spec[1]
  return tuple(a for a in range(len(spec.lhs_shape)) if a != c)


def _normalize(bspec: BlockSpec, u, scale, bias):
  """Training-mode BatchNorm: ``(z, mean, var, inv_std)``, z before ReLU."""
  cs = _channel_shape(bspec.conv)
  axes = _stat_axes(bspec.conv)
  uf = u.astype(jnp.promote_types(u.dtype, jnp.float32))
  mean = jnp.mean(uf, axis=axes)
  var = jnp.mean(jnp.square(uf - mean.reshape(cs)), axis=axes)
  inv = lax.rsqrt(var + bspec.epsilon)
  xhat = (uf - mean.reshape(cs)) * inv.reshape(cs)
  z = xhat * scale.reshape(cs) + bias.reshape(cs)
  return z, mean, var, inv


def _block_forward(bspec: BlockSpec, u, rhs, scale, bias):
  z, mean, var, inv = _normalize(bspec, u, scale, bias)
  a = jnp.maximum(z, 0).astype(u.dtype)
  return bspec.conv.apply(a, rhs), mean, var, z, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block(bspec: BlockSpec, u, rhs, scale, bias):
  y, mean, var, _, _ = _block_forward(bspec, u, rhs, scale, bias)
  return y, mean, var


def _block_fwd(bspec, u, rhs, scale, bias):
  y, mean, var, z, inv = _block_forward(bspec, u, rhs, scale, bias)
  cs = _channel_shape(bspec.conv)
  abs_scale = _abs_scale(scale)
  shift = _shift(bias, abs_scale, bspec.bits).reshape(cs)
  # Position of z / |scale| in bins, counted so that bin `shift` starts at 0:
  # code c holds (c - shift, c - shift + 1] bins, so z > 0 <=> c >= shift.
  pos = z / (abs_scale.reshape(cs) * _bin_width(bspec.bits)) + shift
  if bspec.stochastic:
    codes = jnp.floor(pos - 0.5 + _uniform(z))
    codes = jnp.where(z > 0, jnp.maximum(codes, shift),
                      jnp.minimum(codes, shift - 1))
  else:
    codes = jnp.ceil(pos) - 1.0
  codes = jnp.clip(codes, 0, 2**bspec.bits - 1).astype(jnp.uint32)
  words = packing.pack(codes, bspec.bits)
  y = residuals.tie(y, (words, inv))
  return (y, mean, var), (words, inv, rhs, scale, bias)


def decode_block(bspec: BlockSpec, words, scale, bias):
  """``(x̂, relu output, mask)`` rebuilt from the fused block's codes."""
  spec = bspec.conv
  cs = _channel_shape(spec)
  abs_scale = _abs_scale(scale)
  shift = _shift(bias, abs_scale, bspec.bits).reshape(cs)
  codes = packing.unpack(words, bspec.bits, spec.lhs_shape).astype(
      jnp.float32)
  mask = codes >= shift
  w = (codes - shift + 0.5) * _bin_width(bspec.bits)  # z / |scale|
  xhat = jnp.sign(scale).reshape(cs) * (w - (bias / abs_scale).reshape(cs))
  a = jnp.where(mask, w * abs_scale.reshape(cs), 0.0)
  return xhat, a, mask


def _block_bwd(bspec, saved, cotangents):
  words, inv, rhs, scale, bias = saved
  g = cotangents[0]  # the batch statistics are not differentiated
  spec = bspec.conv
  cs = _channel_shape(spec)
  axes = _stat_axes(spec)
  da = input_transpose(spec, rhs, g)
  # Decode once the convolution's input gradient exists. Pinning on `g`
  # instead chains every block's first element of `g` through the next
  # block's elementwise BatchNorm backward, and XLA then kept every block's
  # masked gradient alive to the end of the step.
  xhat, a, mask = decode_block(bspec, residuals.after(words, da), scale, bias)
  drhs = weight_transpose(spec, a.astype(spec.lhs_dtype), g)
  ct = jnp.promote_types(da.dtype, jnp.float32)
  gz = jnp.where(mask, da.astype(ct), 0.0)
  dbias = jnp.sum(gz, axis=axes)
  dscale = jnp.sum(gz * xhat, axis=axes)
  # BatchNorm's input gradient reuses the two sums (so XLA computes them
  # here, not at the end of the step with gz kept alive until then).
  count = math.prod(spec.lhs_shape) // scale.shape[0]
  du = (inv * scale).reshape(cs) * (
      gz - (dbias / count).reshape(cs) - xhat * (dscale / count).reshape(cs))
  return (du.astype(spec.lhs_dtype), drhs, dscale.astype(scale.dtype),
          dbias.astype(bias.dtype))


_block.defvjp(_block_fwd, _block_bwd)


def block_residual_nbytes(spec: conv_spec_lib.ConvSpec, bits: int) -> int:
  """Bytes :func:`bn_relu_conv` keeps beyond its parameters.

  ``4 · ceil(size · bits / 32)`` for the packed codes of the ``lhs``-shaped
  normalised activation plus ``4 · C`` for the per-channel inverse standard
  deviation.
  """
  c = spec.lhs_shape[spec.dimension_numbers.lhs_spec[1]]
  return packing.packed_nbytes(math.prod(spec.lhs_shape), bits) + 4 * c


def bn_relu_conv(u: jax.typing.ArrayLike, rhs: jax.typing.ArrayLike,
                 scale: jax.typing.ArrayLike, bias: jax.typing.ArrayLike,
                 window_strides, padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None,
                 feature_group_count: int = 1, precision=None, *,
                 bits: int = 8, stochastic: bool = False,
                 epsilon: float = 1e-5):
  """BatchNorm (batch statistics) → ReLU → convolution, saving K-bit codes.

  The unit of Chakrabarti & Moseley (2019): a chain of
  conv → BN → ReLU blocks is ``conv₀`` followed by these units, so each
  block keeps only ``bits`` bits per element of its normalised activation
  (and ``4 · C`` bytes of statistics). The forward pass is exact.

  Args:
    u: Input to the BatchNorm (the previous convolution's output), in the
      convolution's ``lhs`` layout, e.g. ``[N, H, W, C]``.
    rhs: Convolution kernel, e.g. ``[KH, KW, C / groups, O]``.
    scale: BatchNorm scale ``[C]`` (nonzero).
    bias: BatchNorm bias ``[C]``.
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, precision: As ``lax.conv_general_dilated``.
    bits: 2, 4 or 8 bits per saved element.
    stochastic: Stochastic rounding of the codes.
    epsilon: BatchNorm's variance epsilon.

  Returns:
    ``(y, mean, var)``: the convolution output and the batch mean and
    (biased) variance per channel, for running averages. ``mean`` and
    ``var`` are not differentiated (their cotangents are ignored).

  Raises:
    ValueError: for unsupported settings or shapes that do not fit.

  Example::

    y, mean, var = lv.bn_relu_conv(u, w, scale, bias, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   bits=4)
  """
  if isinstance(bits, bool) or bits not in (2, 4, 8):
    raise ValueError(f"bits must be one of (2, 4, 8), got {bits!r}.")
  if not isinstance(stochastic, (bool, np.bool_)):
    raise ValueError(f"stochastic must be True or False, got {stochastic!r}.")
  spec = conv_spec_lib.conv_spec(u, rhs, window_strides, padding,
                                 lhs_dilation, rhs_dilation,
                                 dimension_numbers, feature_group_count, 1,
                                 precision)
  c = spec.lhs_shape[spec.dimension_numbers.lhs_spec[1]]
  for name, v in (("scale", scale), ("bias", bias)):
    if np.shape(v) != (c,):
      raise ValueError(f"{name} must have shape ({c},) (one per input "
                       f"channel); got {np.shape(v)}.")
  bspec = BlockSpec(spec, int(bits), bool(stochastic), float(epsilon))
  return _block(bspec, u, rhs, jnp.asarray(scale), jnp.asarray(bias))
