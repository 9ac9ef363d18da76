"""Replaying a run's needed ranks through a rank controller, offline.

What a :class:`lowrank_vjp.RankController` costs over ε (the capacity it
holds against the ε-optimal ranks) and how many programs it compiles can
be computed without training again. The reason is that every update
applied under rank control kept exactly the ranks ε needed: a step whose
need exceeded its capacity was redone, and a capacity at or above the need
keeps the same ranks. The sequence of needs is therefore the same under any
controller, and a run's ``metrics.jsonl`` (``"ranks"``: the needed ranks
per layer, per step) replays exactly.

:func:`replay` runs a controller over such a sequence, with
:func:`~lowrank_vjp.training.run_step`'s protocol (the first call a probe
at the configured capacities, redone at the fitted ones; an overflowing
call redone at the grown ones).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

import lowrank_vjp as lv
from lowrank_vjp._src.control import rank_controller
from lowrank_vjp._src.tensor import tucker

Capacity = tuple[int | None, ...]


@dataclasses.dataclass(frozen=True)
class Replay:
  """What a controller did over a replayed run.

  Attributes:
    residual_over_optimal: Mean bytes held at the accepted capacities over
      the mean bytes at the needed ranks (Tucker count, float32).
    compiles: Distinct capacity settings compiled (the configured one
      included; those compiled ahead too): the programs a run compiles.
    redone_calls: Calls recomputed (the probe and every overflow).
    capacities: The accepted capacities, one ``{layer: capacity}`` per step.
    stalls: Calls that found their setting not compiled and waited for it.
    background: Settings compiled in the background, used or not.
    fallbacks: Calls run at a larger ready setting while theirs compiled.
  """

  residual_over_optimal: float
  compiles: int
  redone_calls: int
  capacities: tuple[dict[str, Capacity], ...]
  stalls: int = 0
  background: int = 0
  fallbacks: int = 0


def _nbytes(shape, ranks) -> int:
  return tucker.tucker_nbytes(shape, ranks, 4, 4)


def _stats(shape, need, capacity) -> lv.CompressionStats:
  need = np.asarray(need, np.int32)
  cap = np.asarray([n if c is None else c for n, c in
                    zip(need, capacity, strict=True)], np.int32)
  kept = np.minimum(need, cap)
  return lv.CompressionStats(
      needed_ranks=need, kept_ranks=kept,
      kept_energy=np.ones(len(shape), np.float32),
      overflow=np.asarray(bool(np.any(need > cap))), shape=tuple(shape),
      capacity=tuple(capacity), method="hosvd", itemsize=4,
      residual_nbytes=_nbytes(shape, capacity))


def replay(needs: Sequence[Mapping[str, Sequence[int]]],
           shapes: Mapping[str, Sequence[int]],
           initial: Mapping[str, Capacity],
           controller: lv.RankController, max_tries: int = 8,
           probe: bool = True, background_steps: int = 0) -> Replay:
  """Runs ``controller`` over a run's per-step needed ranks.

  Args:
    needs: Per step, ``{layer: needed rank per axis}`` (``metrics.jsonl``'s
      ``"ranks"``).
    shapes: ``{layer: activation shape}``.
    initial: ``{layer: configured capacity}`` (None for an uncompressed
      axis): what the step holds before the controller has seen a step.
    controller: A fresh controller (its settings are what is replayed).
    max_tries: Most calls per step (as ``run_step``).
    probe: The first call is a probe, redone at the fitted capacities (the
      step's protocol since it was introduced); False replays the earlier
      protocol, which applied the first update at the configured ones.
    background_steps: 0: every new setting compiles before its call (as
      ``run_step(..., background=False)``). Else ``run_step``'s background
      compiles, each taken to finish after this many steps: meanwhile a
      call runs at the ready setting that holds its capacities with the
      fewest residual bytes (XLA's peak, which the run compares, is not
      known here), or waits when none does.

  Returns:
    The :class:`Replay`.

  Raises:
    RuntimeError: when a step still overflows after ``max_tries`` calls.

  Example::

    rows = [json.loads(line) for line in open("run/metrics.jsonl")]
    r = replay([row["ranks"] for row in rows], shapes, initial,
               lv.RankController(patience=50))
    r.residual_over_optimal, r.compiles
  """
  held, optimal, accepted = [], [], []
  ready: dict = {}                  # setting -> step from which it is ready
  redone, stalls, fallbacks, ahead = 0, 0, 0, set()
  nbytes = lambda caps: sum(_nbytes(shapes[n], c) for n, c in caps.items())

  def start(setting, step):    # a background compile, unless already known
    if setting not in ready:
      ready[setting] = step + background_steps
      ahead.add(setting)

  for step, need in enumerate(needs):
    key = controller.key()
    for _ in range(max_tries):
      use = key
      if ready.get(key, step + 1) > step:       # not ready at this step
        fits = []
        if background_steps and key is not None:
          start(key, step)
          fits = [k for k, r in ready.items() if k is not None and r <= step
                  and rank_controller.key_holds(k, dict(key))]
        if fits:
          use = min(fits, key=lambda k: nbytes(dict(k)))
          fallbacks += 1
        else:                                   # wait for it
          stalls += 1
          ready[key] = step
      caps = dict(initial) if use is None else {k: tuple(v) for k, v in use}
      stats = {name: _stats(shapes[name], need[name], caps[name])
               for name in need}
      controller.observe(stats)
      overflow = any(bool(s.overflow) for s in stats.values())
      if not (overflow or (probe and use is None)):
        if background_steps:   # the setting a rung above, as run_step
          start(controller.larger(), step)
        break
      redone += 1
      key = controller.key()
    else:
      raise RuntimeError(f"replay: a step still overflowed after "
                         f"{max_tries} calls")
    accepted.append(caps)
    held.append(nbytes(caps))
    optimal.append(sum(_nbytes(shapes[n], need[n]) for n in need))
  return Replay(float(np.mean(held) / max(np.mean(optimal), 1e-12)),
                len(ready), redone, tuple(accepted), stalls, len(ahead),
                fallbacks)
