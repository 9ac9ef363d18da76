"""Approximate activations: K-bit codes of the saved input (``"quant"``).

After Chakrabarti and Moseley, *Backprop with Approximate Activations for
Memory-efficient Network Training*, NeurIPS 2019 (code: ``ayanc/blpa``).
The forward pass is exact and in full precision; what is saved for the
backward pass is a ``bits``-bit code per element, packed into ``uint32``
words (:mod:`packing`).

:class:`Quant` (``compressed_conv(method="quant")``,
``compressed_dense(method="quant")``) codes the layer's input ``x`` over
  ``[max(μ - 3σ, min x), min(μ + 3σ, max x)]``, per layer or per channel, in
  ``2**bits`` equal bins, decoded to the bin midpoints. The weight gradient
  is that of the layer at the decoded input; the input gradient is exact.
The paper's fused BatchNorm → ReLU → convolution unit is
:func:`lowrank_vjp.bn_relu_conv` (:mod:`lowrank_vjp._src.layers.fused`).

Stochastic rounding (``stochastic=True``) adds to each element, before
flooring, a uniform number drawn by a counter-based hash of the element's
position and bits; the decoded value is then unbiased inside the range. It
needs no key and is fixed for a given input.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src.methods import base
from lowrank_vjp._src.tensor import hosvd
from lowrank_vjp._src.tensor import packing

RANGE_SIGMAS = 3.0
"""Half-width of the coded range, in standard deviations."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How :class:`Quant` codes one op's input (hashable).

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


def uniform(x: jax.Array) -> jax.Array:
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
    t = t - 0.5 + uniform(source)
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
  # In units of a power of two near max|x| (exact, undone on lo and step):
  # the variance squares x, which underflows to 0 for |x| below ~1e-19 and
  # would put every element in one bin.
  xf, unscale = hosvd.normalize(x)
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
                       (lo * unscale).astype(jnp.float32),
                       (step * unscale).astype(jnp.float32))


def dequantize(res: QuantResidual, shape, dtype, qspec: QuantSpec
               ) -> jax.Array:
  """The bin midpoints ``lo + (code + 0.5) · step`` as ``dtype[shape]``."""
  codes = packing.unpack(res.words, qspec.bits, shape).astype(jnp.float32)
  ndim = len(shape)
  x = (_broadcast(res.lo, ndim, qspec)
       + (codes + 0.5) * _broadcast(res.step, ndim, qspec))
  return x.astype(dtype)


QUANT_BITS = (2, 4, 8)
"""Code widths of :class:`Quant`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quant(base.Method):
  """K-bit codes of the saved input (Chakrabarti and Moseley, 2019).

  Attributes:
    bits: 2, 4 or 8 bits per saved element.
    per_channel: One coding range per channel (the op's channel axis: a
      convolution's feature axis, a dense layer's last contracting axis).
    stochastic: Stochastic rounding (unbiased inside the range).

  Example::

    conv = lv.compressed_conv(method=lv.methods.Quant(bits=4))
  """

  name = "quant"

  bits: int = 8
  per_channel: bool = False
  stochastic: bool = False

  def __post_init__(self):
    owner = self.label
    base.set_field(self, "bits", base.integer("bits", self.bits, owner,
                                              choices=QUANT_BITS))
    base.set_field(self, "per_channel",
                   base.boolean("per_channel", self.per_channel, owner))
    base.set_field(self, "stochastic",
                   base.boolean("stochastic", self.stochastic, owner))

  def qspec(self, op) -> QuantSpec:
    """How ``op``'s input is coded."""
    return QuantSpec(self.bits, self.per_channel, self.stochastic,
                     op.channel_axis)

  def compress_for(self, op, x, state):
    qspec = self.qspec(op)
    return quantize(x, qspec), stats_lib.uncompressed(
        x.shape, x.dtype, self.label,
        residual_nbytes(tuple(x.shape), qspec)), state

  def rebuild(self, op, residual: QuantResidual):
    return dequantize(residual, op.lhs_shape, op.lhs_dtype, self.qspec(op))
