"""Compression settings: a frozen, hashable description of what to save.

A :class:`CompressionConfig` is pure configuration. It holds no arrays, so it
can sit in ``nondiff_argnums`` of a ``jax.custom_vjp``, in a Flax module field
or in a ``functools.partial`` without triggering recompilation.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np

METHODS = ("none", "hosvd", "svd", "gradfilter", "quant", "checkpoint")
"""Methods understood by :class:`CompressionConfig`."""

TUCKER_METHODS = ("hosvd", "svd")
"""Methods whose residual is a Tucker core and factors (the rank settings)."""

QUANT_BITS = (2, 4, 8)
"""Code widths of ``method="quant"``."""

ON_OVERFLOW = ("warn", "error", "ignore")
"""What a layer does when ε needs more components than its capacity holds."""


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
  """How one layer compresses the activation it saves for the backward pass.

  Attributes:
    method: ``"hosvd"`` (Tucker core and one factor per mode, Nguyen et al.
      2024, §1 of docs/methods.md), ``"svd"`` (truncated SVD of the batch-mode
      unfolding, §2) or ``"none"`` (save the activation as it is).
    eps: Fraction of the variance each compressed mode must keep, in
      ``(0, 1]``. Per mode the fewest leading components whose explained
      variance is ``>= eps`` are kept; components beyond them are masked out.
      ``eps = 1`` keeps everything and reproduces JAX's own gradients.
    ranks: Static rank capacity per axis of the activation (``lhs``), in the
      order of ``lhs``'s axes, or a single int for every compressed axis.
      ``None`` entries leave that axis uncompressed. When ``ranks`` is None the
      capacity is ``ceil(rank_fraction * size)`` per compressed axis (the full
      size when ``eps == 1``), never above the rank the unfolding can have.
      Memory is set by the capacity; ε decides how much of it is used.
    rank_fraction: Default capacity as a fraction of each axis, in ``(0, 1]``.
    on_overflow: What to do when a step needs more components than the
      capacity holds (so less than ε would be kept): ``"warn"`` issues a
      Python warning from the device through ``jax.debug.callback`` (only on
      the steps where it happens), ``"error"`` raises at run time, and
      ``"ignore"`` only reports it in the returned statistics.
  """

  method: str = "hosvd"
  eps: float = 0.9
  ranks: int | tuple[int | None, ...] | None = None
  rank_fraction: float = 0.5
  on_overflow: str = "warn"
  radius: int = 2
  bits: int = 8
  per_channel: bool = False
  stochastic: bool = False

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(
          f"method must be one of {METHODS}, got {self.method!r}.")
    if (isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real)
        or not 0.0 < float(self.eps) <= 1.0 or math.isnan(float(self.eps))):
      raise ValueError(
          f"eps must be a real number in (0, 1], got {self.eps!r}.")
    object.__setattr__(self, "eps", float(self.eps))
    if (isinstance(self.rank_fraction, bool)
        or not isinstance(self.rank_fraction, numbers.Real)
        or not 0.0 < float(self.rank_fraction) <= 1.0):
      raise ValueError("rank_fraction must be a real number in (0, 1], got "
                       f"{self.rank_fraction!r}.")
    object.__setattr__(self, "rank_fraction", float(self.rank_fraction))
    if self.on_overflow not in ON_OVERFLOW:
      raise ValueError(f"on_overflow must be one of {ON_OVERFLOW}, got "
                       f"{self.on_overflow!r}.")
    ranks = self.ranks
    if ranks is not None:
      if isinstance(ranks, Sequence) and not isinstance(ranks, str):
        ranks = tuple(ranks)
        items = ranks
      else:
        items = (ranks,)
      for r in items:
        if r is not None and (isinstance(r, bool)
                              or not isinstance(r, numbers.Integral) or r < 1):
          raise ValueError("ranks must be a positive int, None, or a tuple of "
                           f"positive ints and Nones; got {self.ranks!r}.")
      object.__setattr__(self, "ranks", ranks)
    if (isinstance(self.radius, bool)
        or not isinstance(self.radius, numbers.Integral) or self.radius < 1):
      raise ValueError(
          f"radius must be an int >= 1 (the gradient filter's patch size, "
          f"e.g. 2 or 4), got {self.radius!r}.")
    object.__setattr__(self, "radius", int(self.radius))
    if (isinstance(self.bits, bool) or not isinstance(self.bits,
                                                      numbers.Integral)
        or int(self.bits) not in QUANT_BITS):
      raise ValueError(
          f"bits must be one of {QUANT_BITS}, got {self.bits!r}.")
    object.__setattr__(self, "bits", int(self.bits))
    for name in ("per_channel", "stochastic"):
      value = getattr(self, name)
      if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
      object.__setattr__(self, name, bool(value))

  def capacity(self, shape: Sequence[int],
               batch_axis: int = 0) -> tuple[int | None, ...]:
    """Static rank capacity for an activation of ``shape``.

    Args:
      shape: The activation's shape, e.g. ``[N, H, W, C]``.
      batch_axis: Which axis is the batch; the only one ``"svd"`` compresses.

    Returns:
      One entry per axis: the number of components kept for that mode, or
      ``None`` where the axis is not compressed.

    Raises:
      ValueError: if ``ranks`` has the wrong length for ``shape``.
    """
    shape = tuple(int(d) for d in shape)
    ndim = len(shape)
    if self.method not in TUCKER_METHODS:
      return (None,) * ndim
    compressed = (range(ndim) if self.method == "hosvd" else (batch_axis,))
    if isinstance(self.ranks, tuple):
      if len(self.ranks) != ndim:
        raise ValueError(
            f"ranks has {len(self.ranks)} entries but the activation has "
            f"{ndim} axes (shape {shape}); give one entry per axis.")
      requested = self.ranks
    else:
      requested = (self.ranks,) * ndim
    size = math.prod(shape)
    out = []
    for axis, n in enumerate(shape):
      if axis not in compressed:
        out.append(None)
        continue
      bound = max(1, min(n, size // max(n, 1)))  # rank of the unfolding
      r = requested[axis]
      if r is None and self.ranks is not None and isinstance(self.ranks, tuple):
        out.append(None)
        continue
      if r is None:
        r = n if self.eps >= 1.0 else math.ceil(self.rank_fraction * n)
      out.append(max(1, min(int(r), bound)))
    return tuple(out)
