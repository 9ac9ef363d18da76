"""What the Tucker-residual methods share: ranks, capacities, the backward.

HOSVD-ε, the batch-mode SVD-ε and ASI all save a
:class:`~lowrank_vjp._src.tensor.tucker.TuckerResidual` and differ only in
which modes they compress and how they find the factors. This module holds
their common settings (``ranks``, ``rank_fraction``), the static capacity
per axis, and the weight gradient (the op's rank-space fast path when it has
one, else the op's reference gradient at the rebuilt input).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import ClassVar

import jax

from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src.methods import base
from lowrank_vjp._src import schedule
from lowrank_vjp._src.tensor import capacity as capacity_lib
from lowrank_vjp._src.tensor import hosvd
from lowrank_vjp._src.tensor import tucker as tucker_lib

RankSetting = int | tuple[int | None, ...] | None


def check_ranks(ranks, owner: str) -> RankSetting:
  """Validates a ``ranks`` setting: None, a positive int, or a tuple of them.

  Returns:
    ``ranks`` normalised (a tuple when a sequence was given).

  Raises:
    ValueError: naming the bad entry.
  """
  if ranks is None:
    return None
  items = tuple(ranks) if isinstance(ranks, Sequence) and not isinstance(
      ranks, str) else (ranks,)
  for r in items:
    if r is not None and (isinstance(r, bool)
                          or not isinstance(r, numbers.Integral) or r < 1):
      raise ValueError(
          f"{owner}: ranks must be a positive int, None, or a tuple of "
          f"positive ints and Nones (one per axis); got {ranks!r}.")
  if isinstance(ranks, Sequence) and not isinstance(ranks, str):
    return tuple(None if r is None else int(r) for r in items)
  return int(ranks)


def capacity(shape: Sequence[int], ranks: RankSetting, rank_fraction: float,
             compressed: Sequence[int], owner: str, full: bool = False
             ) -> tuple[int | None, ...]:
  """Static rank capacity per axis of an activation of ``shape``.

  Args:
    shape: The activation's shape.
    ranks: None (``ceil(rank_fraction · size)`` per compressed axis), an int
      for every compressed axis (capped at each axis's rank bound), or one
      entry per axis (None: leave that axis uncompressed).
    rank_fraction: Default capacity as a fraction of each axis.
    compressed: The axes the method compresses.
    owner: The method's name, for error messages.
    full: Use every component by default (ε = 1).

  Returns:
    One capacity per axis, None for uncompressed axes; never above the rank
    the axis's unfolding can have.

  Raises:
    ValueError: for a tuple of the wrong length, or an explicit entry larger
      than its axis, or set on an axis the method does not compress.
  """
  shape = tuple(int(d) for d in shape)
  ndim = len(shape)
  explicit = isinstance(ranks, tuple)
  requested = capacity_lib.per_axis(ranks, ndim, "axes", shape) if explicit \
      else (ranks,) * ndim
  out = []
  for axis, n in enumerate(shape):
    r = requested[axis]
    if axis not in compressed:
      if explicit and r is not None:
        raise ValueError(
            f"{owner}: ranks[{axis}] = {r} but {owner} does not compress axis "
            f"{axis} (it compresses axes {tuple(compressed)}); give None "
            f"there (ranks={ranks!r}, activation shape {shape}).")
      out.append(None)
      continue
    if explicit and r is None:
      out.append(None)
      continue
    if explicit and r > n:
      raise ValueError(
          f"{owner}: ranks[{axis}] = {r} is larger than axis {axis}, whose "
          f"size is {n} (activation shape {shape}); give at most {n}.")
    bound = capacity_lib.rank_bound(shape, axis)
    if r is None:
      r = n if full else capacity_lib.resolve(rank_fraction, n, bound)
    out.append(max(1, min(int(r), bound)))
  return tuple(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuckerMethod(base.Method):
  """Base of the methods that save a Tucker core and factors.

  Attributes:
    ranks: Static rank capacity per axis of the activation (``lhs``), in the
      order of its axes, or one int for every compressed axis. ``None``
      entries leave that axis uncompressed. When None the capacity is
      ``ceil(rank_fraction · size)`` per compressed axis.
    rank_fraction: Default capacity as a fraction of each axis, in ``(0, 1]``.
  """

  ranks: RankSetting = None
  rank_fraction: float = 0.5

  compress_all_axes: ClassVar[bool] = True

  def __post_init__(self):
    owner = self.label
    base.set_field(self, "ranks", check_ranks(self.ranks, owner))
    base.set_field(self, "rank_fraction",
                   base.fraction("rank_fraction", self.rank_fraction, owner))

  def compressed_axes(self, ndim: int, batch_axis: int) -> tuple[int, ...]:
    """The axes this method compresses."""
    return tuple(range(ndim)) if self.compress_all_axes else (batch_axis,)

  def uses_all_components(self) -> bool:
    """Whether the default capacity is the full axis (ε = 1)."""
    return False

  def capacity(self, shape: Sequence[int],
               batch_axis: int = 0) -> tuple[int | None, ...]:
    """Static rank capacity per axis for an activation of ``shape``.

    See :func:`capacity`.
    """
    return capacity(shape, self.ranks, self.rank_fraction,
                    self.compressed_axes(len(shape), batch_axis), self.label,
                    self.uses_all_components())

  def decompress(self, residual: tucker_lib.TuckerResidual,
                 like: jax.ShapeDtypeStruct) -> jax.Array:
    return residual.reconstruct(dtype=like.dtype)

  def weight_grad(self, op, residual: tucker_lib.TuckerResidual,
                  g: jax.Array) -> jax.Array:
    """The op's rank-space gradient, or its reference at the rebuilt input."""
    fast = op.tucker_weight_grad(residual, g)
    if fast is not None:
      return fast
    core = schedule.after(residual.core, g)
    lhs = tucker_lib.TuckerResidual(core, residual.factors).reconstruct(
        dtype=op.lhs_dtype)
    return op.weight_grad(lhs, g)

  def with_capacity(self, capacity: tuple[int | None, ...]) -> TuckerMethod:
    return dataclasses.replace(self, ranks=tuple(capacity))


@dataclasses.dataclass(frozen=True, kw_only=True)
class EpsTuckerMethod(TuckerMethod):
  """A Tucker method whose ranks per step are chosen by ε (HOSVD, SVD).

  Attributes:
    eps: Fraction of the variance each compressed mode must keep, in
      ``(0, 1]``. Per mode the fewest leading components whose explained
      variance is ``>= eps`` are kept; components beyond them are masked
      out. ``eps = 1`` keeps everything and reproduces JAX's own gradients.
    on_overflow: What to do when a step needs more components than the
      capacity holds (so less than ε would be kept): ``"warn"`` issues a
      Python warning from the device through ``jax.debug.callback`` (only on
      the steps where it happens), ``"error"`` raises at run time, and
      ``"ignore"`` only reports it in the returned statistics.
  """

  eps: float = 0.9
  on_overflow: str = "warn"

  def __post_init__(self):
    super().__post_init__()
    owner = self.label
    base.set_field(self, "eps", base.fraction("eps", self.eps, owner))
    base.set_field(self, "on_overflow", base.choice(
        "on_overflow", self.on_overflow, stats_lib.ON_OVERFLOW, owner))

  def uses_all_components(self) -> bool:
    return self.eps >= 1.0

  def compress_for(self, op, x, state):
    cap = self.capacity(x.shape, op.batch_axis)
    res, stats = hosvd.tucker_compress(x, cap, self.eps, self.label)
    return res, stats, state

  def report(self, stats):
    stats_lib.report_overflow(self.on_overflow, self.eps, stats)
