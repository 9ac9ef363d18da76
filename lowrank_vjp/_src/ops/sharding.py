"""Per-device compression when the batch is sharded over mesh axes.

Under plain ``jax.jit`` a batch-sharded activation would make the batch-mode
Gram (and the batch-mode SVD) gather the whole activation across devices, or,
with explicit mesh axes, fail with a sharding type error. When ``lhs``'s
batch axis is sharded over explicit mesh axes (the default of
``jax.make_mesh`` in jax 0.10) and nothing else is, the compressed call runs
inside ``jax.shard_map``: each device decomposes and saves its own shard, and
only the weight gradient crosses devices (a ``psum``, as in data-parallel
training). The weight is ``pcast`` to varying so that its cotangent comes back
summed.

Statistics come back with a leading device axis (the controller and the
tables reduce over it).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import lax
from jax.sharding import PartitionSpec as P


def batch_shards(lhs, rhs, batch_axis: int):
  """``(mesh, axes)`` when only ``lhs``'s batch axis is sharded, else None."""
  try:
    lhs_sharding = jax.typeof(lhs).sharding
    rhs_sharding = jax.typeof(rhs).sharding
  except Exception:  # pylint: disable=broad-except  # not an array / old jax
    return None
  mesh = getattr(lhs_sharding, "mesh", None)
  spec = getattr(lhs_sharding, "spec", None)
  if mesh is None or spec is None or not getattr(mesh, "axis_names", ()):
    return None
  spec = tuple(spec) + (None,) * (len(lhs.shape) - len(tuple(spec)))
  axes = spec[batch_axis]
  if axes is None:
    return None
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  others = [s for a, s in enumerate(spec) if a != batch_axis]
  rhs_spec = tuple(getattr(rhs_sharding, "spec", ()) or ())
  if any(s is not None for s in others) or any(s is not None
                                                for s in rhs_spec):
    return None   # model-parallel layouts: leave it to the compiler
  return mesh, axes


def per_shard(fn: Callable, lhs, rhs, shards, out_batch_axis: int,
              out_ndim: int):
  """Runs ``fn(lhs, rhs) -> (y, stats)`` on each batch shard.

  Args:
    fn: The compressed op on local operands.
    lhs: Activation whose batch axis is sharded.
    rhs: Weight (replicated).
    shards: ``(mesh, axes)`` from :func:`batch_shards`.
    out_batch_axis: The output's batch axis.
    out_ndim: The output's rank.

  Returns:
    ``(y, stats)``: ``y`` sharded like ``lhs`` on its batch axis; every stats
    array has a leading device axis.
  """
  mesh, axes = shards
  lhs_spec = list(jax.typeof(lhs).sharding.spec)
  lhs_spec += [None] * (len(lhs.shape) - len(lhs_spec))
  out_spec = [None] * out_ndim
  out_spec[out_batch_axis] = axes

  def local(l, r):
    r = lax.pcast(r, axes, to="varying")
    y, stats = fn(l, r)
    return y, jax.tree_util.tree_map(lambda s: s[None], stats)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(*lhs_spec), P()),
                       out_specs=(P(*out_spec), P(axes)))(lhs, rhs)
