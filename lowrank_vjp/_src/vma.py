"""The varying/invariant mesh-axis type of arrays inside ``shard_map``."""

from __future__ import annotations

import jax


def varying(x) -> frozenset:
  """The mesh axes ``x`` varies over inside ``shard_map`` (empty outside)."""
  try:
    t = jax.typeof(x)
  except Exception:  # pylint: disable=broad-except  # not an array
    return frozenset()
  vma = getattr(t, "vma", None)
  if vma is None:
    vma = getattr(getattr(t, "manual_axis_type", None), "varying", ())
  return frozenset(vma or ())


def like(y: jax.Array, x) -> jax.Array:
  """``y`` cast to vary over the mesh axes ``x`` varies over.

  For a loop's starting carry (e.g. zeros) that must have the type of what
  the loop body computes from ``x``.
  """
  missing = tuple(sorted(varying(x) - varying(y)))
  return jax.lax.pcast(y, missing, to="varying") if missing else y
