"""Activations whose saved residual is a bit-packed mask or coded slope.

``jax.nn.relu``'s gradient rule makes XLA keep the float pre-activation (or a
byte mask it can fuse back into it) until the backward pass, which keeps a
compressed convolution's output alive at full size. These versions save one
bit per element, packed 32 to a ``uint32`` word by a reduction; that packing
survives XLA's fusion and scheduling (measured, see docs/memory.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_vjp._src import remat
from lowrank_vjp._src import schedule
from lowrank_vjp._src.tensor import packing as packing


def _pack(mask: jax.Array) -> jax.Array:
  """Packs a boolean mask into ``uint32`` words, 32 elements per word.

  The words come out of a reduction, the last op before the residual: with
  ``jnp.packbits`` XLA kept the pre-``convert`` ``uint32`` array (4× the
  packed bytes) and converted it to ``uint8`` in the backward pass.
  """
  return packing.pack(mask, 1)


def _unpack(packed: jax.Array, like: jax.Array) -> jax.Array:
  return packing.unpack(packed, 1, like.shape).astype(bool)


@jax.custom_vjp
def relu(x: jax.typing.ArrayLike) -> jax.Array:
  """``max(x, 0)``, saving a 1-bit mask for the backward pass.

  Args:
    x: Any shape, floating dtype.

  Returns:
    ``max(x, 0)``, same shape and dtype. The gradient is ``g · [x > 0]``
    (0 at ``x = 0``, as ``jax.nn.relu``); the residual is
    ``4 · ceil(x.size / 32)`` bytes.

  Example::

    y = lv.relu(conv(x, w, (1, 1), "SAME"))
  """
  return jnp.maximum(x, 0)


def _relu_fwd(x):
  # Computed once (schedule.computed_once): every reader of the output (the
  # next convolution, a skip addition, the mask, a compression) reads one
  # buffer, which XLA may write over ``x``. Fused into each reader instead,
  # a residual stream of lv.relu blocks kept every block's convolution
  # output alive; inside a never-true conditional (as before) the input and
  # the output were two buffers alive together. The mask is the output's:
  # ``y > 0`` exactly where ``x > 0``, except that a subnormal ``x`` may be
  # flushed to zero, as XLA:CPU flushes it in every arithmetic op.
  y = schedule.computed_once(jnp.maximum(x, 0))
  return y, remat.named(_pack(y > 0))


def _relu_bwd(packed, g):
  return (jnp.where(_unpack(packed, g), g, jnp.zeros_like(g)),)


relu.defvjp(_relu_fwd, _relu_bwd)


@jax.custom_vjp
def relu6(x: jax.typing.ArrayLike) -> jax.Array:
  """``min(max(x, 0), 6)``, saving a 1-bit mask for the backward pass.

  Args:
    x: Any shape, floating dtype.

  Returns:
    ``clip(x, 0, 6)``. The gradient is ``g · [0 < x < 6]`` (as
    ``jax.nn.relu6``); the residual is ``4 · ceil(x.size / 32)`` bytes.
  """
  return jnp.clip(x, 0, 6)


def _relu6_fwd(x):
  # As lv.relu's: one buffer for every reader, the mask from the output.
  y = schedule.computed_once(jnp.clip(x, 0, 6))
  return y, remat.named(_pack((y > 0) & (y < 6)))


relu6.defvjp(_relu6_fwd, _relu_bwd)


# ------------------------------------------- smooth activations, coded ---
#
# hard-swish, SiLU and GELU have a slope that depends on the input's value,
# so an exact gradient needs the full input. These versions save the slope
# f'(x) itself as a `bits`-bit code on a grid whose levels include 0 and 1
# exactly (so the flat and the identity parts of hard-swish are exact), packed
# into uint32 words: 1/4 (8 bits) or 1/8 (4 bits) of a float32 input.

_SLOPE_RANGES = {
    "hard_swish": (-0.5, 1.5),
    "silu": (-0.1, 1.1),
    "gelu": (-0.13, 1.13),
}
SLOPE_BITS = (4, 8)
"""Code widths of the coded-slope activations."""


def slope_grid(name: str, bits: int) -> tuple[int, int]:
  """``(n, m)``: level ``k`` of the slope code stands for ``(k - m) / n``.

  ``n`` is the largest denominator for which ``2**bits`` levels cover the
  activation's slope range; 0 and 1 are levels ``m`` and ``m + n``. The
  slope error is at most ``1 / (2n)``.
  """
  lo, hi = _SLOPE_RANGES[name]
  n = int(np.floor((2**bits - 2) / (hi - lo)))
  m = int(np.ceil(-lo * n))
  return n, m


def _check_slope_bits(bits):
  if (isinstance(bits, bool) or not isinstance(bits, (int, np.integer))
      or bits not in SLOPE_BITS):
    raise ValueError(f"bits must be one of {SLOPE_BITS} (an int), got "
                     f"{bits!r}.")


def _slope(fn, x):
  """``f'(x)`` elementwise, with JAX's own rule at kinks.

  At ``±inf`` the slope is its limit (1 and 0 for these activations), where
  the product rule gives ``inf · 0 = nan``; a NaN input keeps a NaN slope.
  """
  slope = jax.jvp(fn, (x,), (jnp.ones_like(x),))[1]
  return jnp.where(jnp.isposinf(x), 1.0,
                   jnp.where(jnp.isneginf(x), 0.0, slope)).astype(slope.dtype)


def _nan_code(bits: int) -> int:
  """The code reserved for a NaN slope (the grid never reaches it)."""
  return 2**bits - 1


def _encode_slope(name, bits, slope):
  n, m = slope_grid(name, bits)
  codes = jnp.clip(jnp.round(slope.astype(jnp.float32) * n) + m, 0,
                   _nan_code(bits) - 1)
  codes = jnp.where(jnp.isnan(slope), _nan_code(bits), codes)
  return packing.pack(codes.astype(jnp.uint32), bits)


def _decode_slope(name, bits, words, like):
  n, m = slope_grid(name, bits)
  codes = packing.unpack(words, bits, like.shape).astype(jnp.float32)
  slope = jnp.where(codes == _nan_code(bits), jnp.nan, (codes - m) / n)
  return slope.astype(like.dtype)


_FUNCTIONS = {
    "hard_swish": jax.nn.hard_swish,
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _coded(name: str, bits: int, x):
  return _FUNCTIONS[name](x)


def _coded_fwd(name, bits, x):
  fn = _FUNCTIONS[name]
  grid = "gelu" if name.startswith("gelu") else name
  return fn(x), remat.named(_encode_slope(grid, bits, _slope(fn, x)))


def _coded_bwd(name, bits, words, g):
  grid = "gelu" if name.startswith("gelu") else name
  return (g * _decode_slope(grid, bits, words, g),)


_coded.defvjp(_coded_fwd, _coded_bwd)


def hard_swish(x: jax.typing.ArrayLike, *, bits: int = 8) -> jax.Array:
  """``x · relu6(x + 3) / 6``, saving its slope as a ``bits``-bit code.

  Args:
    x: Any shape, floating dtype.
    bits: 8 (slope error at most 1/254) or 4 (at most 1/14).

  Returns:
    ``jax.nn.hard_swish(x)`` exactly. The gradient is ``g · s`` with ``s``
    the slope rounded to the grid of :func:`slope_grid`; it is exact where
    the slope is 0 (``x <= -3``) or 1 (``x >= 3``). The residual is
    ``4 · ceil(x.size · bits / 32)`` bytes.

  Example::

    y = lv.hard_swish(conv(x, w, (1, 1), "SAME"))
  """
  _check_slope_bits(bits)
  return _coded("hard_swish", int(bits), jnp.asarray(x))


def silu(x: jax.typing.ArrayLike, *, bits: int = 8) -> jax.Array:
  """``x · sigmoid(x)``, saving its slope as a ``bits``-bit code.

  Args:
    x: Any shape, floating dtype.
    bits: 8 (slope error at most 1/422) or 4 (at most 1/22).

  Returns:
    ``jax.nn.silu(x)`` exactly; the gradient uses the coded slope (exact
    slopes 0 and 1 far from the origin). Residual:
    ``4 · ceil(x.size · bits / 32)`` bytes instead of the float input.

  Example::

    y = lv.silu(conv(x, w, (1, 1), "SAME"), bits=8)
  """
  _check_slope_bits(bits)
  return _coded("silu", int(bits), jnp.asarray(x))


def gelu(x: jax.typing.ArrayLike, approximate: bool = False, *,
         bits: int = 8) -> jax.Array:
  """GELU, saving its slope as a ``bits``-bit code.

  Args:
    x: Any shape, floating dtype.
    approximate: As ``jax.nn.gelu`` (tanh approximation when True). Note
      the default here is the exact erf form.
    bits: 8 (slope error at most 1/402) or 4 (at most 1/22).

  Returns:
    ``jax.nn.gelu(x, approximate)`` exactly; the gradient uses the coded
    slope. Residual: ``4 · ceil(x.size · bits / 32)`` bytes.

  Example::

    y = lv.gelu(dense(x, w, (((1,), (0,)), ((), ()))), approximate=True)
  """
  _check_slope_bits(bits)
  name = "gelu_tanh" if approximate else "gelu"
  return _coded(name, int(bits), jnp.asarray(x))
