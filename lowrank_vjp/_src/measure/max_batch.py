"""The largest batch whose compiled training step fits a memory budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lowrank_vjp._src.measure import xla


@dataclasses.dataclass(frozen=True)
class MaxBatch:
  """What :func:`max_batch` found.

  Attributes:
    batch: The largest batch size whose step fits (0 if none does).
    peak_bytes: XLA's estimated peak of that step (0 if none fits).
    budget_bytes: The budget searched against.
    tried: ``{batch: estimated peak bytes}`` of every compiled step.
  """

  batch: int
  peak_bytes: int
  budget_bytes: int
  tried: dict[int, int]


def max_batch(make_step: Callable[[int], tuple[Callable, tuple]],
              budget_bytes: int, *, start: int = 1,
              limit: int = 1 << 16, tolerance: float = 0.0) -> MaxBatch:
  """Largest batch size whose step's estimated peak fits ``budget_bytes``.

  Compile-only: each candidate step is lowered and compiled, never run, and
  judged by XLA's estimated peak (``argument + output + temp − alias``,
  :class:`~lowrank_vjp.measure.XlaMemory`), so build every candidate the way
  it will run (same donation, same shardings). The search doubles the batch
  from ``start`` until a step no longer fits, then bisects; it assumes the
  peak grows with the batch. On a GPU the allocator's peak in a fresh
  process (``memory_stats()['peak_bytes_in_use']``) is the ground truth;
  this is the compiler's estimate.

  Args:
    make_step: ``batch -> (step_fn, args)``; ``step_fn`` is jitted if it is
      not already (a jitted one keeps its own ``donate_argnums``), ``args``
      may be ``jax.ShapeDtypeStruct`` s.
    budget_bytes: The memory budget.
    start: The smallest batch tried.
    limit: The largest batch tried.
    tolerance: Stop bisecting once the fitting and the failing batch are
      within ``max(1, tolerance × fitting)`` of each other (0: exact), to
      spend fewer compiles on large models; the result fits either way.

  Returns:
    A :class:`MaxBatch`.

  Raises:
    ValueError: for a non-positive budget, start or limit.

  Example::

    def make_step(b):
      x = jax.ShapeDtypeStruct((b, 96, 96, 3), jnp.float32)
      return jax.jit(train_step, donate_argnums=0), (state, x)

    found = lv.measure.max_batch(make_step, 2 * 2**30)   # 2 GiB
    print(found.batch, found.peak_bytes / 2**20)
  """
  for name, value in (("budget_bytes", budget_bytes), ("start", start),
                      ("limit", limit)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"max_batch: {name} must be a positive int, got "
                       f"{value!r}.")
  if start > limit:
    raise ValueError(f"max_batch: start={start} is above limit={limit}.")
  if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
      or not 0 <= tolerance < 1):
    raise ValueError(f"max_batch: tolerance must be a number in [0, 1), got "
                     f"{tolerance!r}.")
  tried: dict[int, int] = {}

  def peak(batch: int) -> int:
    if batch not in tried:
      fn, args = make_step(batch)
      tried[batch] = xla.xla_memory(fn, *args).peak_bytes
    return tried[batch]

  if peak(start) > budget_bytes:
    return MaxBatch(0, 0, budget_bytes, dict(sorted(tried.items())))
  fits, too_big = start, None
  while too_big is None and fits < limit:
    candidate = min(2 * fits, limit)
    if peak(candidate) <= budget_bytes:
      fits = candidate
    else:
      too_big = candidate
  while too_big is not None and too_big - fits > max(1, tolerance * fits):
    mid = (fits + too_big) // 2
    if peak(mid) <= budget_bytes:
      fits = mid
    else:
      too_big = mid
  return MaxBatch(fits, tried[fits], budget_bytes, dict(sorted(tried.items())))
