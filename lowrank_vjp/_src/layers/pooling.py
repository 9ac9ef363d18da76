"""Max pooling whose residual is the argmax of each window, bit-packed.

``flax.linen.max_pool`` (``lax.reduce_window`` with ``max``) is
differentiated through ``select_and_scatter_add``, which XLA:CPU expands into
index arrays of the padded input's size (four ``int32`` iotas) and a
zero-filled gradient buffer it allocates at the start of the step: five
activation-sized buffers for ResNet's stem, more than every compressed
convolution behind it keeps. :func:`max_pool` saves, per output, which tap
of its window held the maximum, in 4 bits for windows of up to 15 taps (8
up to 255), and its
backward pass places each output's cotangent at that tap.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lowrank_vjp._src import remat
from lowrank_vjp._src.tensor import packing


def _window(x, window_shape, strides, padding):
  """Full-rank window, strides and explicit pads over ``x``'s spatial axes."""
  n = len(window_shape)
  if x.ndim != n + 2:
    raise ValueError(f"max_pool: inputs must be [batch, *spatial({n}), "
                     f"features] for window_shape={tuple(window_shape)}; got "
                     f"shape {x.shape}.")
  strides = tuple(strides) if strides is not None else (1,) * n
  if len(strides) != n:
    raise ValueError(f"max_pool: strides={strides} must have one entry per "
                     f"window axis ({n}).")
  dims = (1,) + tuple(window_shape) + (1,)
  full_strides = (1,) + strides + (1,)
  if isinstance(padding, str):
    pads = tuple(lax.padtype_to_pads(x.shape, dims, full_strides, padding))
  else:
    padding = tuple(tuple(p) for p in padding)
    if len(padding) != n:
      raise ValueError(f"max_pool: padding={padding} must have one (low, "
                       f"high) pair per window axis ({n}).")
    pads = ((0, 0),) + padding + ((0, 0),)
  return dims, full_strides, tuple(tuple(int(v) for v in p) for p in pads)


def _code_bits(taps: int) -> int:
  """Packing width for codes ``0..taps`` (``taps``: no tap matched)."""
  need = max(1, math.ceil(math.log2(taps + 1)))
  for bits in packing.BITS:
    if bits >= need:
      return bits
  raise ValueError(f"max_pool: a window of {taps} taps is too large for "
                   f"{max(packing.BITS)}-bit codes (at most "
                   f"{2**max(packing.BITS) - 1} taps).")


def _lowest(dtype):
  return jnp.array(-jnp.inf, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, dims, strides, pads):
  return lax.reduce_window(x, _lowest(x.dtype), lax.max, dims, strides, pads)


def _taps(dims):
  return list(itertools.product(*(range(d) for d in dims[1:-1])))


def _tap_view(x, tap, out_shape, strides, pads):
  """What tap ``tap`` of every window reads: ``[N, *out, C]``, -inf in pads.

  Output ``o`` reads input ``o·s + t - lo`` along each window axis: a
  strided slice of ``x`` over the outputs whose tap lands inside it, padded
  with -inf to the other outputs. Each tap pads its own slice (one use per
  pad), so XLA fuses the taps into the code computation; one padded copy
  of ``x`` shared by the nine taps was a buffer of its own, bigger than
  ``x`` (at ResNet18's stem, the step's largest).
  """
  starts, limits, steps, config = [0], [x.shape[0]], [1], [(0, 0, 0)]
  for t, st, (lo, _), o, n in zip(tap, strides[1:-1], pads[1:-1],
                                  out_shape[1:-1], x.shape[1:-1]):
    off = t - lo                            # input index of output 0's tap
    first = max(0, (st - 1 - off) // st)    # first output inside the input
    last = min(o - 1, (n - 1 - off) // st)  # last one
    if last < first:
      return jnp.full(out_shape, _lowest(x.dtype))
    start = first * st + off
    starts.append(start)
    limits.append(start + (last - first) * st + 1)
    steps.append(st)
    config.append((first, o - 1 - last, 0))
  starts.append(0)
  limits.append(x.shape[-1])
  steps.append(1)
  config.append((0, 0, 0))
  view = lax.slice(x, starts, limits, steps)
  return lax.pad(view, _lowest(x.dtype), config)


def _max_pool_fwd(x, dims, strides, pads):
  y = _max_pool(x, dims, strides, pads)
  taps = _taps(dims)
  code = jnp.full(y.shape, len(taps), jnp.uint32)
  for k in reversed(range(len(taps))):  # the first tap holding the max wins
    hit = _tap_view(x, taps[k], y.shape, strides, pads) == y
    code = jnp.where(hit, jnp.uint32(k), code)
  words = remat.named(packing.pack(code, _code_bits(len(taps))))
  # An empty array whose shape and dtype are x's (features axis emptied).
  return y, (words, jnp.zeros(x.shape[:-1] + (0,), x.dtype))


def _max_pool_bwd(dims, strides, pads, res, g):
  words, like = res
  x_shape = like.shape[:-1] + g.shape[-1:]
  taps = _taps(dims)
  code = packing.unpack(words, _code_bits(len(taps)), g.shape)
  window, step = dims[1:-1], strides[1:-1]
  out = g.shape[1:-1]
  # Tap t = q·s + r of output o lands on padded position (o + q)·s + r: per
  # phase r, the cotangents of the taps with that phase, shifted by q, sum
  # in one fused elementwise pass; the phases are then interleaved. (One
  # zero buffer scattered into tap by tap held nine padded copies at once.)
  # The stack of phases fuses into what consumes the cotangent only while a
  # single fusion reads it: XLA does not copy a concatenate into a second
  # reader (even of one element, as schedule.after reads g) and then keeps
  # the stack, 1.06x the input, as a buffer of its own. Interior-padded
  # pads, per-tap broadcasts or slices of a padded g fused worse still.
  reach = [-(-w // st) for w, st in zip(window, step)]          # Q = ⌈w/s⌉
  blocks = [o + q - 1 for o, q in zip(out, reach)]              # B = O + Q - 1
  zero = jnp.zeros((), like.dtype)
  phases = []
  for r in itertools.product(*(range(st) for st in step)):
    acc = jnp.zeros((g.shape[0], *blocks, g.shape[-1]), like.dtype)
    for q in itertools.product(*(range(n) for n in reach)):
      tap = tuple(qq * st + rr for qq, st, rr in zip(q, step, r))
      if any(t >= w for t, w in zip(tap, window)):
        continue
      part = jnp.where(code == taps.index(tap), g, jnp.zeros_like(g))
      config = [(0, 0, 0)] + [(qq, b - o - qq, 0)
                              for qq, b, o in zip(q, blocks, out)] + [(0, 0, 0)]
      acc = acc + lax.pad(part.astype(like.dtype), zero, config)
    phases.append(acc)
  n = len(step)
  dxp = jnp.stack(phases).reshape(tuple(step) + phases[0].shape)
  # [s_1.., N, B_1.., C] -> [N, B_1, s_1, .., C] -> [N, B_1·s_1, .., C]
  order = [n] + [a for d in range(n) for a in (n + 1 + d, d)] + [2 * n + 1]
  dxp = jnp.transpose(dxp, order).reshape(
      (g.shape[0], *(b * st for b, st in zip(blocks, step)), g.shape[-1]))
  start = tuple(lo for lo, _ in pads)
  stop = tuple(b + s for b, s in zip(start, x_shape))
  # Input rows no window reaches (a VALID remainder) get no cotangent.
  short = [(0, max(0, e - d), 0) for e, d in zip(stop, dxp.shape)]
  return (lax.slice(lax.pad(dxp, zero, short), start, stop),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(inputs: jax.typing.ArrayLike, window_shape: Sequence[int],
             strides: Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = "VALID") -> jax.Array:
  """``flax.linen.max_pool`` whose backward keeps a few bits per output.

  Same values and gradient as ``nn.max_pool`` (the first maximum of a
  window takes its cotangent when several tie); the residual is the tap
  index of each output's maximum, 4 bits for a 3×3 window (8 for up to 255
  taps), instead of the index arrays and zero buffer the standard
  gradient makes XLA allocate at the input's size.

  Args:
    inputs: ``[batch, *spatial, features]``, floating dtype.
    window_shape: Window size per spatial axis.
    strides: Stride per spatial axis (default 1).
    padding: ``"VALID"``, ``"SAME"`` or one ``(low, high)`` per spatial axis.

  Returns:
    The pooled array.

  Example::

    x = lv.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
  """
  x = jnp.asarray(inputs)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"max_pool: inputs must have a floating dtype; got "
                    f"{x.dtype}.")
  dims, full_strides, pads = _window(x, window_shape, strides, padding)
  if any(d < 1 for d in dims) or any(s < 1 for s in full_strides):
    raise ValueError(f"max_pool: window_shape={tuple(window_shape)} and "
                     f"strides={strides} must be positive.")
  return _max_pool(x, dims, full_strides, pads)
