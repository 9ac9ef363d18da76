"""The fused BatchNorm → ReLU → convolution unit, saving K-bit codes.

After Chakrabarti and Moseley, *Backprop with Approximate Activations for
Memory-efficient Network Training*, NeurIPS 2019. The unit's only
full-resolution residual is the codes of the BatchNorm-normalised value. The
bins are ``6 / 2**bits`` wide in units of the batch standard deviation and
placed so that ReLU's threshold is a bin edge: the ReLU mask is read off the
codes exactly; the BatchNorm backward and the weight gradient use the
decoded values. Stochastic rounding is :mod:`lowrank_vjp._src.methods.quant`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank_vjp._src.methods import quant
from lowrank_vjp._src.ops import conv as conv_spec_lib
from lowrank_vjp._src import remat
from lowrank_vjp._src import schedule
from lowrank_vjp._src.tensor import packing

RANGE_SIGMAS = quant.RANGE_SIGMAS
_uniform = quant.uniform


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
  words, inv = remat.named((packing.pack(codes, bspec.bits), inv))
  y = schedule.tie(y, (words, inv))
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
  da = spec.input_grad(schedule.after(rhs, g), g)
  # Decode once the convolution's input gradient exists. Pinning on `g`
  # instead chains every block's first element of `g` through the next
  # block's elementwise BatchNorm backward, and XLA then kept every block's
  # masked gradient alive to the end of the step.
  xhat, a, mask = decode_block(bspec, schedule.after(words, da), scale, bias)
  drhs = spec.weight_grad(a.astype(spec.lhs_dtype), g)
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
