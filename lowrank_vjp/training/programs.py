"""The compiled training step per capacity setting, with its cost apart.

A rank controller changes the step's static capacities, so a run calls
several programs. :class:`Programs` compiles each ahead of time (the first
time its setting is asked for, or in the background when
:meth:`Programs.prefetch` names it before it is needed), so that step times
never include a compile, and keeps what each cost: compile seconds, the
seconds a step waited for one, and XLA's memory figures of the very program
that runs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Hashable

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
    max_programs: Most compiled programs kept at once (None: no bound);
      beyond it the least recently used is released and compiled again if
      its setting comes back. Every program holds its machine code: a long
      run whose rank controller visits hundreds of settings otherwise grows
      without bound (a 17-layer HOSVD run exhausted Linux's default 65,530
      memory mappings per process after about 560 steps and crashed in
      LLVM).

  Attributes:
    compile_s: Seconds of compilation per setting (recompilations added),
      in the background or not.
    wait_s: Seconds callers waited for a compile (the stall a step feels);
      a prefetched program that was ready in time costs none.
    memory: :class:`lowrank_vjp.measure.XlaMemory` per setting.
    steps: Calls per setting (counted by :meth:`count`).
    compiles: Compilations, recompilations of released programs included.
    prefetched: Settings compiled by :meth:`prefetch`.
    prefetch_used: Prefetched settings that were later called.
    fallbacks: Calls made at another compiled setting while theirs compiled
      in the background (counted by
      :func:`~lowrank_vjp.training.run_step`).
  """

  def __init__(self, train_step, *example, max_programs: int | None = 16):
    if max_programs is not None and (
        isinstance(max_programs, bool) or not isinstance(max_programs, int)
        or max_programs < 1):
      raise ValueError("Programs: max_programs must be None or an int >= 1, "
                       f"got {max_programs!r}.")
    self._step = train_step
    self._example = jax.tree.map(_spec, example)
    self._compiled: collections.OrderedDict[Hashable, object] = (
        collections.OrderedDict())
    self.max_programs = max_programs
    self.compile_s: dict[Hashable, float] = {}
    self.memory: dict[Hashable, object] = {}
    self.steps: collections.Counter = collections.Counter()
    self.compiles = 0
    self.wait_s = 0.0
    self.prefetched: set[Hashable] = set()
    self.prefetch_used: set[Hashable] = set()
    self.fallbacks = 0
    self._lock = threading.Lock()
    self._pending: dict[Hashable, concurrent.futures.Future] = {}
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  def __call__(self, capacities=None):
    with self._lock:
      if capacities in self.prefetched:
        self.prefetch_used.add(capacities)
      if capacities in self._compiled:
        self._compiled.move_to_end(capacities)
        return self._compiled[capacities]
      pending = self._pending.get(capacities)
    t = time.perf_counter()
    if pending is not None and pending.cancel():
      pending = None     # still queued behind another: compile it here now
    if pending is not None:
      compiled = pending.result()   # compiling in the background: wait
    else:
      compiled = self._compile(capacities)
    self.wait_s += time.perf_counter() - t
    return compiled

  def ready(self, capacities) -> bool:
    """Whether ``capacities``' program is compiled and held (no wait)."""
    with self._lock:
      return capacities in self._compiled

  def held_settings(self) -> list:
    """The settings whose programs are compiled and held now."""
    with self._lock:
      return list(self._compiled)

  def prefetch(self, capacities) -> None:
    """Compiles ``capacities``' program in a background thread.

    The steps go on meanwhile (at another setting), and the call that needs
    it finds it compiled, or waits only for the rest of its compile.
    Settings already compiled or compiling are ignored. A compile error
    surfaces when the setting is called.
    """
    with self._lock:
      if capacities in self._compiled or capacities in self._pending:
        return
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="lowrank_vjp-prefetch")
      self.prefetched.add(capacities)
      self._pending[capacities] = self._pool.submit(self._compile, capacities)

  def close(self, cancel: bool = False) -> None:
    """Waits for background compiles and stops their thread.

    Args:
      cancel: Drop the compiles not started yet (the one running
        finishes); for the end of a run, whose remaining steps need none.
    """
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=cancel)
      self._pool = None
      with self._lock:
        for key in [k for k, f in self._pending.items() if f.cancelled()]:
          del self._pending[key]
          self.prefetched.discard(key)

  def _compile(self, capacities):
    t = time.perf_counter()
    try:
      compiled = self._step.lower(*self._example,
                                  capacities=capacities).compile()
    except BaseException:
      with self._lock:
        self._pending.pop(capacities, None)
      raise
    with self._lock:
      self._pending.pop(capacities, None)
      self.compile_s[capacities] = (self.compile_s.get(capacities, 0.0)
                                    + time.perf_counter() - t)
      self.memory[capacities] = report_lib.compiled_memory(compiled)
      self.compiles += 1
      self._compiled[capacities] = compiled
      while (self.max_programs is not None
             and len(self._compiled) > self.max_programs):
        self._compiled.popitem(last=False)
    return compiled

  def count(self, capacities) -> None:
    """Records one step run at ``capacities``."""
    self.steps[capacities] += 1

  def __len__(self) -> int:
    """Distinct settings compiled (released ones included)."""
    return len(self.compile_s)

  @property
  def held(self) -> int:
    """Compiled programs held now (at most ``max_programs``)."""
    return len(self._compiled)

  @property
  def compile_time(self) -> float:
    """Seconds spent compiling, all settings together (background too)."""
    with self._lock:
      return float(sum(self.compile_s.values()))

  def most_run(self):
    """XLA's memory of the program that ran the most steps (else the first)."""
    key = (self.steps.most_common(1)[0][0] if self.steps
           else next(iter(self.memory)))
    return self.memory[key]

  def largest_peak(self):
    """XLA's memory of the program with the highest estimated peak among
    those that ran a step (all compiled ones before any step is counted)."""
    ran = [self.memory[k] for k in self.steps if k in self.memory]
    return max(ran or self.memory.values(), key=lambda m: m.peak_bytes)


def largest_batch(train_step, state, frozen,
                  batch_inputs: Callable[[int], tuple], budget_bytes: int,
                  capacities=None, *, start: int = 1,
                  tolerance: float = 0.05):
  """The largest batch whose training step fits ``budget_bytes``.

  :func:`lowrank_vjp.measure.max_batch` over the step that runs: the same
  step function, donated the same way (the state), at ``capacities``.

  Args:
    train_step: From :func:`~lowrank_vjp.training.make_train_step`.
    state: The training state (arrays or shapes).
    frozen: The frozen variables.
    batch_inputs: ``batch -> (inputs, labels)`` as
      ``jax.ShapeDtypeStruct`` s.
    budget_bytes: The budget, on XLA's estimated peak.
    capacities: The static capacities the step is compiled at.
    start: The smallest batch tried (a run's own batch: its capacities may
      not fit a smaller one).
    tolerance: As for :func:`lowrank_vjp.measure.max_batch` (5 %: fewer
      compiles; the result fits either way).

  Returns:
    A :class:`lowrank_vjp.measure.MaxBatch`.
  """
  import lowrank_vjp as lv  # pylint: disable=g-import-not-at-top
  state, frozen = jax.tree.map(_spec, (state, frozen))
  step = jax.jit(lambda s, f, x, y: train_step(s, f, x, y,
                                               capacities=capacities),
                 donate_argnums=0)

  def make_step(batch):
    return step, (state, frozen, *batch_inputs(batch))

  return lv.measure.max_batch(make_step, budget_bytes, start=start,
                              tolerance=tolerance)
