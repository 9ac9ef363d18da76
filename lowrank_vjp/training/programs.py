"""The compiled training step per capacity setting, with its cost apart.

A rank controller changes the step's static capacities, so a run calls
several programs. :class:`Programs` compiles each ahead of time (the first
time its setting is asked for), so that step times never include a compile,
and keeps what each cost: compile seconds and XLA's memory figures of the
very program that runs.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Hashable

import jax

from lowrank_vjp.training import report as report_lib


def _spec(x):
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


class Programs:
  """``programs(capacities)``: the compiled step for one capacity setting.

  Args:
    train_step: From :func:`~lowrank_vjp.training.make_train_step` (jitted,
      ``capacities`` static).
    *example: ``(state, frozen, images, labels)`` as arrays or
      ``jax.ShapeDtypeStruct`` s (only shapes, dtypes and shardings are
      kept, so donated arrays may be passed).

  Attributes:
    compile_s: Seconds of compilation per setting.
    memory: :class:`lowrank_vjp.measure.XlaMemory` per setting.
    steps: Calls per setting (counted by :meth:`count`).
  """

  def __init__(self, train_step, *example):
    self._step = train_step
    self._example = jax.tree.map(_spec, example)
    self._compiled: dict[Hashable, object] = {}
    self.compile_s: dict[Hashable, float] = {}
    self.memory: dict[Hashable, object] = {}
    self.steps: collections.Counter = collections.Counter()

  def __call__(self, capacities=None):
    if capacities not in self._compiled:
      t = time.perf_counter()
      compiled = self._step.lower(*self._example,
                                  capacities=capacities).compile()
      self.compile_s[capacities] = time.perf_counter() - t
      self.memory[capacities] = report_lib.compiled_memory(compiled)
      self._compiled[capacities] = compiled
    return self._compiled[capacities]

  def count(self, capacities) -> None:
    """Records one step run at ``capacities``."""
    self.steps[capacities] += 1

  def __len__(self) -> int:
    return len(self._compiled)

  @property
  def compile_time(self) -> float:
    """Seconds spent compiling, all settings together."""
    return float(sum(self.compile_s.values()))

  def most_run(self):
    """XLA's memory of the program that ran the most steps (else the first)."""
    key = (self.steps.most_common(1)[0][0] if self.steps
           else next(iter(self.memory)))
    return self.memory[key]

  def largest_peak(self):
    """XLA's memory of the compiled program with the highest estimated peak."""
    return max(self.memory.values(), key=lambda m: m.peak_bytes)
