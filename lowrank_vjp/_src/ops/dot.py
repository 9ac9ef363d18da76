"""The dense op: ``lax.dot_general`` with arguments resolved.

``lhs`` is the activation (``[N, F]`` or ``[N, T, F]`` in Flax's Dense),
``rhs`` the weight. The Tucker fast path of the weight gradient,
``dW = Σ_free x ⊗ g``, is contracted in the rank space: ``g`` is projected
on the factors of ``lhs``'s free axes, contracted with the core, and expanded
with the factors of the contracting axes.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank_vjp._src.ops import base
from lowrank_vjp._src.tensor import tucker as tucker_lib

TuckerResidual = tucker_lib.TuckerResidual


@dataclasses.dataclass(frozen=True)
class DotSpec(base.Op):
  """A ``lax.dot_general`` call with its arguments resolved (hashable)."""

  lhs_shape: tuple[int, ...]
  lhs_dtype: Any
  rhs_shape: tuple[int, ...]
  rhs_dtype: Any
  dimension_numbers: tuple[tuple[tuple[int, ...], tuple[int, ...]],
                           tuple[tuple[int, ...], tuple[int, ...]]]
  precision: Any
  preferred_element_type: Any
  out_sharding: Any = None
  lhs_manual: Any = None
  rhs_manual: Any = None

  kind = "dot"

  @property
  def batch_axis(self) -> int:
    """The first batch dimension of ``lhs`` if there is one, else axis 0."""
    (_, _), (lb, _) = self.dimension_numbers
    return lb[0] if lb else 0

  @property
  def channel_axis(self) -> int:
    """``lhs``'s last contracting axis (its features)."""
    (lc, _), _ = self.dimension_numbers
    return lc[-1] if lc else len(self.lhs_shape) - 1

  def apply(self, lhs, rhs, **overrides) -> jax.Array:
    kw = dict(precision=self.precision,
              preferred_element_type=self.preferred_element_type)
    if self.out_sharding is not None:
      kw["out_sharding"] = self.out_sharding
    kw.update(overrides)
    return lax.dot_general(lhs, rhs, self.dimension_numbers, **kw)

  def tucker_weight_grad(self, res: TuckerResidual, g) -> jax.Array | None:
    """``d rhs`` in the rank space; None with batch dimensions (rebuild)."""
    if self.dimension_numbers[1][0]:
      return None
    return weight_grad_tucker(self, res, g)


def dot_spec(lhs, rhs, dimension_numbers, precision=None,
             preferred_element_type=None, out_sharding=None) -> DotSpec:
  """Validates ``lax.dot_general`` arguments and resolves them.

  Raises:
    TypeError: for non-floating operands.
    ValueError: for dimension numbers that do not fit the shapes.
  """
  base.check_float("lhs", lhs)
  base.check_float("rhs", rhs)
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    dn = ((tuple(int(a) for a in lc), tuple(int(a) for a in rc)),
          (tuple(int(a) for a in lb), tuple(int(a) for a in rb)))
  except (TypeError, ValueError) as e:
    raise ValueError(
        "dimension_numbers must be ((lhs_contracting, rhs_contracting), "
        f"(lhs_batch, rhs_batch)); got {dimension_numbers!r}.") from e
  spec = DotSpec(tuple(np.shape(lhs)), jnp.result_type(lhs),
                 tuple(np.shape(rhs)), jnp.result_type(rhs), dn,
                 tuple(precision) if isinstance(precision, list) else precision,
                 None if preferred_element_type is None else
                 jnp.dtype(preferred_element_type), out_sharding,
                 base.manual_axis_type(lhs),
                 base.manual_axis_type(rhs))
  try:
    jax.eval_shape(lambda l, r: spec.apply(l, r, out_sharding=None),
                   jax.ShapeDtypeStruct(spec.lhs_shape, spec.lhs_dtype),
                   jax.ShapeDtypeStruct(spec.rhs_shape, spec.rhs_dtype))
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"lhs shape {spec.lhs_shape} and rhs shape {spec.rhs_shape} do not fit "
        f"dimension_numbers {dimension_numbers!r}: {e}") from e
  return spec


def weight_grad_tucker(spec: DotSpec, res: TuckerResidual, g):
  """``d rhs`` without rebuilding ``lhs`` (no batch dimensions)."""
  (lc, rc), _ = spec.dimension_numbers
  nl, nr = len(spec.lhs_shape), len(spec.rhs_shape)
  lfree = [a for a in range(nl) if a not in lc]
  rfree = [a for a in range(nr) if a not in rc]
  letters = iter(string.ascii_letters)
  lhs_full = {a: next(letters) for a in range(nl)}   # activation axes
  lhs_rank = {a: next(letters) for a in range(nl)}   # rank axes
  rfree_l = {a: next(letters) for a in rfree}
  ct = jnp.promote_types(res.core.dtype, jnp.float32)
  factors = [f if f is None else f.astype(ct) for f in res.factors]
  # Output y axes: lhs free axes (in order), then rhs free axes.
  g_idx = [lhs_full[a] for a in lfree] + [rfree_l[a] for a in rfree]
  t, t_idx = g.astype(ct), list(g_idx)
  for a in lfree:
    if factors[a] is None:
      continue
    new = [lhs_rank[a] if x == lhs_full[a] else x for x in t_idx]
    t = jnp.einsum(f"{''.join(t_idx)},{lhs_full[a]}{lhs_rank[a]}->"
                   f"{''.join(new)}", t, factors[a], precision=spec.precision)
    t_idx = new
  core_idx = [lhs_full[a] if factors[a] is None else lhs_rank[a]
              for a in range(nl)]
  h_idx = [core_idx[a] for a in lc] + [rfree_l[a] for a in rfree]
  h = jnp.einsum(f"{''.join(core_idx)},{''.join(t_idx)}->{''.join(h_idx)}",
                 res.core.astype(ct), t, precision=spec.precision)
  for a in lc:
    if factors[a] is None:
      continue
    new = [lhs_full[a] if x == lhs_rank[a] else x for x in h_idx]
    h = jnp.einsum(f"{''.join(h_idx)},{lhs_full[a]}{lhs_rank[a]}->"
                   f"{''.join(new)}", h, factors[a], precision=spec.precision)
    h_idx = new
  # h axes: lhs contracting axes (paired with rc, in order), then rhs free.
  rhs_axes = list(rc) + rfree
  return jnp.transpose(h, np.argsort(rhs_axes)).astype(spec.rhs_dtype)
