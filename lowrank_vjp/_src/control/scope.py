"""The capacity scope: per-layer rank capacities set around a traced step.

:func:`rank_capacities` is read at trace time by the Flax modules, keyed by
module path; :func:`configured` gives a layer's method with the capacity the
scope sets for it. See :mod:`lowrank_vjp._src.control.rank_controller`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping

from lowrank_vjp._src.control.rank_controller import Capacity
from lowrank_vjp._src.control.rank_controller import CapacityKey

_SCOPE = threading.local()


@contextlib.contextmanager
def rank_capacities(
    capacities: Mapping[str, Capacity] | CapacityKey | None
) -> Iterator[None]:
  """Sets per-layer rank capacities for the compressed layers traced inside.

  Read at trace time by the Flax modules, keyed by module path (the keys of
  :func:`lowrank_vjp.flax.collect_stats`). Layers without an entry keep their
  own configuration. Open it inside the jitted function and pass the
  capacities as a static argument (see the module docstring).

  Args:
    capacities: ``{layer: capacity}``, a :meth:`RankController.key`, or None
      (no override).
  """
  previous = getattr(_SCOPE, "value", None)
  _SCOPE.value = None if capacities is None else dict(capacities)
  try:
    yield
  finally:
    _SCOPE.value = previous


def configured(method, layer: str):
  """``method`` with the capacity the current scope sets for ``layer``.

  Methods without ranks ignore the scope (:meth:`Method.with_capacity`).
  """
  scope = getattr(_SCOPE, "value", None)
  if not scope or layer not in scope:
    return method
  return method.with_capacity(tuple(scope[layer]))
