"""Static rank capacities: how many components a mode may keep.

Under ``jax.jit`` shapes are static, so a Tucker factor has a fixed number of
columns (its *capacity*); ε or a rank controller decides how many of them are
used. Everything that turns a user's ``ranks`` setting into per-mode
capacities goes through this module: the compression methods (HOSVD, SVD,
ASI), the rank controller and the TDLRT weights.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

Ranks = int | float | None | tuple[int | float | None, ...]


def rank_bound(shape: Sequence[int], axis: int) -> int:
  """Largest rank the mode-``axis`` unfolding of a ``shape`` tensor can have.

  ``min(I_axis, Π_{other} I)``, and at least 1 (an empty axis still gets a
  one-column factor, full of zeros).
  """
  shape = tuple(int(d) for d in shape)
  size = math.prod(shape)
  n = shape[axis]
  return max(1, min(n, size // max(n, 1)))


def is_rank_value(r) -> bool:
  """Whether ``r`` is a valid single rank: a positive int or a fraction."""
  if isinstance(r, bool):
    return False
  if isinstance(r, numbers.Integral):
    return r >= 1
  if isinstance(r, numbers.Real):
    return 0.0 < float(r) <= 1.0
  return False


def per_axis(ranks: Ranks, ndim: int, what: str = "axes",
             shape: Sequence[int] | None = None) -> tuple:
  """``ranks`` as one entry per axis (a scalar is repeated).

  Args:
    ranks: A scalar or a sequence.
    ndim: The number of axes (or modes).
    what: What the entries are for, plural, in messages (``"axes"``,
      ``"modes"``).
    shape: The shape, for messages.

  Raises:
    ValueError: for a tuple of the wrong length.
  """
  if isinstance(ranks, Sequence) and not isinstance(ranks, str):
    ranks = tuple(ranks)
    if len(ranks) != ndim:
      where = f" (shape {tuple(shape)})" if shape is not None else ""
      one = {"axes": "axis"}.get(what, what.removesuffix("s"))
      raise ValueError(
          f"ranks has {len(ranks)} entries but there are {ndim} {what}"
          f"{where}; give one entry per {one}.")
    return ranks
  return (ranks,) * ndim


def resolve(r, size: int, bound: int | None = None) -> int:
  """One capacity: an int is taken as is, a float in ``(0, 1]`` as a fraction.

  Args:
    r: Positive int, or a fraction of ``size``.
    size: The axis size.
    bound: Optional upper bound (the unfolding's rank); defaults to ``size``.

  Returns:
    ``max(1, min(r or ceil(r·size), bound))``.
  """
  bound = size if bound is None else bound
  if isinstance(r, numbers.Integral):
    value = int(r)
  else:
    value = math.ceil(float(r) * size)
  return max(1, min(value, bound))
