"""Static rank capacities that follow ε across a run: ladder, hysteresis, scope.

Under ``jax.jit`` a layer's rank capacity is a static shape. The
:class:`RankController` runs outside jit: each step it reads the ranks every
layer needed (their :class:`CompressionStats`), and moves each layer's
capacity on a coarse :class:`RankLadder` — up at once when ε needed more
(that step is reported for a redo), down only after the need has stayed a
rung lower for ``patience`` steps. Few distinct capacity settings means few
compiles; a revisited setting hits jit's cache. With ``shrink_every``, shrinks
wait for a review every that many accepted steps and happen together, so a
run compiles one setting per review rather than one per layer.

Capacities reach the layers through :func:`rank_capacities`, a scope read at
trace time by the Flax modules (by module path). Pass the controller's
:meth:`RankController.key` as a static argument of the jitted step and open
the scope inside the step, so that a new setting compiles a new program::

  @functools.partial(jax.jit, static_argnames="capacities")
  def grads(params, batch, capacities):
    with lv.rank_capacities(capacities):
      (loss, state), g = jax.value_and_grad(loss_fn, has_aux=True)(...)
    return g, state["compression"]

  controller = lv.RankController()
  while True:
    g, sown = grads(params, batch, capacities=controller.key())
    if not controller.observe(lvf.collect_stats(sown)):
      break            # every layer kept >= eps: apply g
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping

import jax
import numpy as np

from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src.tensor import capacity as capacity_lib

Capacity = tuple[int | None, ...]
CapacityKey = tuple[tuple[str, Capacity], ...]


@dataclasses.dataclass(frozen=True)
class RankLadder:
  """The coarse set of values a capacity may take.

  Rungs are ``k · (1 + i / per_octave)`` for the powers of two ``k`` and
  ``i = 0 … per_octave - 1``, rounded down: with ``per_octave=2`` the powers
  of two and their halfway points, ``1, 2, 3, 4, 6, 8, 12, 16, 24, 32, …``
  (consecutive rungs differ by a factor 1.33 or 1.5); with ``per_octave=4``
  ``1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, …`` (at most 1.25). Rungs
  are capped at the axis's rank bound, which is always a rung. Finer rungs
  hold less beyond what ε needs but change more often (each change of a
  setting is a compile).

  Attributes:
    minimum: Smallest rung used (a floor for every capacity).
    per_octave: Rungs per factor of two, ``>= 1``.
  """

  minimum: int = 1
  per_octave: int = 2

  def __post_init__(self):
    for name in ("minimum", "per_octave"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}.")

  def rungs(self, bound: int) -> tuple[int, ...]:
    """All rungs up to and including ``bound``."""
    out, k = set(), 1
    while k < bound:
      out.update(r for r in (k + k * i // self.per_octave
                             for i in range(self.per_octave))
                 if self.minimum <= r < bound)
      k *= 2
    return tuple(sorted(out)) + (int(bound),)

  def fit(self, need: int, bound: int) -> int:
    """The smallest rung that holds ``need`` components."""
    for r in self.rungs(bound):
      if r >= need:
        return r
    return int(bound)


def key_holds(setting: CapacityKey, want: Mapping[str, Capacity]) -> bool:
  """Whether capacity ``setting`` holds at least ``want`` in every mode.

  A step run at such a setting keeps the same ε-ranks as at ``want``
  wherever ``want`` holds the need, so it computes the same update.

  Args:
    setting: A :meth:`RankController.key`.
    want: ``{layer: capacity}`` (a key's ``dict``).
  """
  have = dict(setting)
  for layer, capacity in want.items():
    other = have.get(layer)
    if other is None or len(other) != len(capacity):
      return False
    for c, o in zip(capacity, other):
      if (c is None) != (o is None) or (c is not None and o < c):
        return False
  return True


@dataclasses.dataclass
class _LayerState:
  capacity: Capacity
  below: list[int]         # consecutive steps each mode fit a lower rung
  window_max: list[int]    # largest need per mode during that streak


class RankController:
  """Chooses every layer's static rank capacity from the ranks ε needed.

  Args:
    ladder: Values capacities may take.
    patience: Steps a mode's need must stay below its capacity's rung before
      the capacity shrinks (hysteresis).
    headroom: Grow to the rung holding ``ceil(headroom × need)``; ``> 1``
      anticipates drift and saves recompiles.
    shrink_every: None (the default): each mode shrinks on the step its own
      streak reaches ``patience``. An int: shrinks happen only on every
      ``shrink_every``-th accepted step (a review), all modes whose streak
      has reached ``patience`` together. Growing is never delayed.

  Attributes:
    capacities: Current capacity per layer name.
    history: One ``{layer: capacity}`` per distinct setting used, in order;
      ``len(history)`` is the number of compiles a jitted step needs.
    redos: Steps that overflowed and were reported for a redo.
    steps: Observations that kept ε on every layer, the first one (the
      probe that fits the capacities) not counted: the clock of the
      ``shrink_every`` reviews.
  """

  def __init__(self, ladder: RankLadder | None = None, patience: int = 50,
               headroom: float = 1.0, shrink_every: int | None = None):
    if (isinstance(patience, bool) or not isinstance(patience, numbers.Integral)
        or patience < 1):
      raise ValueError(f"RankController: patience must be an int >= 1 (steps),"
                       f" got {patience!r}.")
    if (isinstance(headroom, bool) or not isinstance(headroom, numbers.Real)
        or not math.isfinite(float(headroom)) or headroom < 1.0):
      raise ValueError(f"RankController: headroom must be a finite number >= "
                       f"1, got {headroom!r}.")
    if shrink_every is not None and (
        isinstance(shrink_every, bool)
        or not isinstance(shrink_every, numbers.Integral) or shrink_every < 1):
      raise ValueError(f"RankController: shrink_every must be None or an int "
                       f">= 1 (steps), got {shrink_every!r}.")
    if ladder is not None and not isinstance(ladder, RankLadder):
      raise ValueError(f"RankController: ladder must be a RankLadder, got "
                       f"{ladder!r}.")
    self.ladder = ladder or RankLadder()
    self.patience = int(patience)
    self.headroom = float(headroom)
    self.shrink_every = None if shrink_every is None else int(shrink_every)
    self.steps = 0   # accepted steps observed, the first (probe) not
    self._layers: dict[str, _LayerState] = {}
    self._shapes: dict[str, tuple[int, ...]] = {}
    self.history: list[dict[str, Capacity]] = []
    self.redos = 0
    self._seen: set[CapacityKey] = set()

  @property
  def capacities(self) -> dict[str, Capacity]:
    return {k: v.capacity for k, v in self._layers.items()}

  def key(self) -> CapacityKey | None:
    """Hashable capacities for a static jit argument (None before any step).

    Before the first :meth:`observe` the layers run at their configured
    default capacity; the first observation then sets every layer from what
    it needed.
    """
    if not self._layers:
      return None
    return tuple(sorted(self.capacities.items()))

  def observe(self, stats: Mapping[str, stats_lib.CompressionStats]) -> bool:
    """Updates capacities from one step's statistics.

    Args:
      stats: Layer name to concrete :class:`CompressionStats` (stacked stats
        of several calls are reduced by max).

    Returns:
      True when some layer needed more than its capacity on this step (it
      kept less than ε): its capacity has been raised, and the step should be
      recomputed with :meth:`key` before its update is applied.
    """
    probe = not self._layers   # fits the capacities; not a training step
    overflow = False
    review = (self.shrink_every is None
              or (self.steps + 1) % self.shrink_every == 0)
    for name, s in stats.items():
      self._shapes[name] = tuple(s.shape)
      needed = np.asarray(jax.device_get(s.needed_ranks)).reshape(
          -1, len(s.shape)).max(axis=0)
      kept = np.asarray(jax.device_get(s.kept_ranks)).reshape(
          -1, len(s.shape)).min(axis=0)
      layer = self._layers.get(name)
      if layer is None:
        cap = tuple(
            None if c is None else self._grow_to(int(n), s.shape, a)
            for a, (c, n) in enumerate(zip(s.capacity, needed)))
        self._layers[name] = _LayerState(cap, [0] * len(cap), [0] * len(cap))
        overflow |= bool(np.any(needed > kept))
        continue
      cap = list(layer.capacity)
      for a, c in enumerate(cap):
        if c is None:
          continue
        need = int(needed[a])
        bound = capacity_lib.rank_bound(s.shape, a)
        if need > c or need > int(kept[a]):
          cap[a] = max(c, self._grow_to(need, s.shape, a))
          layer.below[a], layer.window_max[a] = 0, 0
          overflow = True
        elif self.ladder.fit(need, bound) < c:
          layer.below[a] += 1
          layer.window_max[a] = max(layer.window_max[a], need)
        else:
          layer.below[a], layer.window_max[a] = 0, 0
      layer.capacity = tuple(cap)
    # A review waits for an accepted step; without reviews a streak that
    # reached patience shrinks at once, as it always did.
    if review and (self.shrink_every is None or not overflow):
      self._shrink()
    key = self.key()
    if key not in self._seen:
      self._seen.add(key)
      self.history.append(dict(key))
    self.redos += int(overflow)
    self.steps += int(not (overflow or probe))
    return overflow

  def larger(self) -> CapacityKey | None:
    """The current setting with every capacity one rung up (capped at its
    axis's rank bound); None before any step.

    A step whose need grew by up to a rung in any set of modes fits it, so
    a loop that keeps it compiled (``run_step(..., background=True)``) can
    run such a step at once while the exact setting compiles.
    """
    if not self._layers:
      return None
    out = []
    for name, layer in self._layers.items():
      shape = self._shapes[name]
      out.append((name, tuple(
          None if c is None else self.ladder.fit(
              min(c + 1, capacity_lib.rank_bound(shape, a)),
              capacity_lib.rank_bound(shape, a))
          for a, c in enumerate(layer.capacity))))
    return tuple(sorted(out))

  def _shrink(self) -> None:
    for name, layer in self._layers.items():
      cap = list(layer.capacity)
      for a, c in enumerate(cap):
        if c is not None and layer.below[a] >= self.patience:
          cap[a] = self._grow_to(layer.window_max[a], self._shapes[name], a)
          layer.below[a], layer.window_max[a] = 0, 0
      layer.capacity = tuple(cap)

  def state_dict(self) -> dict:
    """Everything the controller has learned, as JSON-compatible data.

    Save it with a training checkpoint: a resumed run that restores it
    (:meth:`load_state_dict`) makes the same capacity decisions, so it
    reproduces the uninterrupted run exactly.
    """
    return {
        "layers": {k: {"capacity": list(v.capacity), "below": list(v.below),
                       "window_max": list(v.window_max)}
                   for k, v in self._layers.items()},
        "history": [{k: list(c) for k, c in h.items()} for h in self.history],
        "redos": self.redos,
        "steps": self.steps,
        "shapes": {k: list(v) for k, v in self._shapes.items()},
    }

  def load_state_dict(self, state: dict) -> None:
    """Restores what :meth:`state_dict` returned."""
    self._layers = {
        k: _LayerState(tuple(v["capacity"]), list(v["below"]),
                       list(v["window_max"]))
        for k, v in state["layers"].items()}
    self.history = [{k: tuple(c) for k, c in h.items()}
                    for h in state["history"]]
    self._seen = {tuple(sorted(h.items())) for h in self.history}
    self.redos = int(state["redos"])
    # Older checkpoints lack the two: their runs shrank without reviews.
    self.steps = int(state.get("steps", 0))
    self._shapes = {k: tuple(v) for k, v in state.get("shapes", {}).items()}

  def _grow_to(self, need: int, shape, axis) -> int:
    bound = capacity_lib.rank_bound(shape, axis)
    return self.ladder.fit(min(bound, math.ceil(need * self.headroom)), bound)
