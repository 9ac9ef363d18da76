"""When a TDLRT loop augments, takes Galerkin steps and truncates.

The paper's algorithm augments, takes one Galerkin step and truncates at
every step (:func:`lowrank_vjp.tdlrt.step`). The reference implementation
(RobustDLRT, by co-authors of the paper) trains differently: it augments the
bases, takes several optimizer steps on the core in that fixed augmented
basis, truncates, and after the rank-adaptive phase trains the cores at fixed
ranks. :class:`Cycle` says which of :func:`augment`, :func:`galerkin_step`
and :func:`truncate` a loop calls at each step.

One difference from the reference remains on purpose: there the batch that
augments takes no optimizer step; here the cycle's first batch augments and
then takes the Galerkin step too, so that every batch trains the network and
``local_steps=1`` is exactly :func:`lowrank_vjp.tdlrt.step`.
"""

from __future__ import annotations

import dataclasses
import numbers

AUGMENT = "augment"
GALERKIN = "galerkin"
TRUNCATE = "truncate"


def _check_int(name: str, value, low: int) -> None:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < low):
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class Cycle:
  """A TDLRT training schedule: augment–train–truncate cycles, then fine-tuning.

  Steps ``0 … adaptive_steps − 1`` form cycles of ``local_steps`` steps: the
  first augments the bases, every step takes one Galerkin (core) step, and
  the last truncates (so does the last adaptive step, if it ends a cycle
  early). Steps ``adaptive_steps … adaptive_steps + finetune_steps − 1`` take
  Galerkin steps at the ranks the adaptive phase ended with.

  Attributes:
    adaptive_steps: Steps of rank adaptation.
    local_steps: Galerkin steps per augmented basis; 10 in the reference
      implementation (its ``num_local_iter``), 1 in the paper's algorithm.
    finetune_steps: Fixed-rank steps after the adaptive phase.

  Example:
    >>> Cycle(adaptive_steps=4, local_steps=2, finetune_steps=1).actions(1)
    ('galerkin', 'truncate')
  """

  adaptive_steps: int
  local_steps: int = 10
  finetune_steps: int = 0

  def __post_init__(self):
    _check_int("adaptive_steps", self.adaptive_steps, 0)
    _check_int("local_steps", self.local_steps, 1)
    _check_int("finetune_steps", self.finetune_steps, 0)

  @property
  def total_steps(self) -> int:
    """Every step of the schedule (each takes one optimizer step)."""
    return self.adaptive_steps + self.finetune_steps

  def actions(self, i: int) -> tuple[str, ...]:
    """What step ``i`` does, in order: a subset of ``("augment",
    "galerkin", "truncate")``.

    Raises:
      ValueError: if ``i`` is outside ``[0, total_steps)``.
    """
    if not (isinstance(i, numbers.Integral) and 0 <= i < self.total_steps):
      raise ValueError(f"step must be in [0, {self.total_steps}), got {i!r}.")
    if i >= self.adaptive_steps:
      return (GALERKIN,)
    pos = i % self.local_steps
    out = (AUGMENT,) if pos == 0 else ()
    out += (GALERKIN,)
    if pos == self.local_steps - 1 or i == self.adaptive_steps - 1:
      out += (TRUNCATE,)
    return out
