"""What every op shares: a contraction ``y = f(lhs, rhs)`` linear in each.

An op is a frozen, hashable description of one call (shapes, dtypes and
every static argument resolved), so it can sit in ``nondiff_argnums`` of the
one custom VJP (:mod:`lowrank_vjp._src.ops.vjp`). It owns three things:

* :meth:`Op.apply`: the exact forward pass;
* :meth:`Op.input_grad`: the exact ``d lhs``, which needs only ``rhs``;
* :meth:`Op.weight_grad`: the reference ``d rhs`` at a (rebuilt) ``lhs``;

and optionally a fast path for Tucker residuals
(:meth:`Op.tucker_weight_grad`). Methods (:mod:`lowrank_vjp._src.methods`)
never look at an op's type; they use this interface.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lowrank_vjp._src import vma


def manual_axis_type(x):
  """``x``'s varying/invariant mesh-axis type inside ``shard_map`` (or None)."""
  try:
    return getattr(jax.typeof(x), "manual_axis_type", None)
  except Exception:  # pylint: disable=broad-except  # non-array or old jax
    return None


def aval(shape, dtype, manual=None) -> jax.ShapeDtypeStruct:
  """A ``ShapeDtypeStruct``, carrying a manual axis type when there is one."""
  if manual is None:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)


def transpose(fn, primal: jax.ShapeDtypeStruct, ct) -> jax.Array:
  """Applies the transpose of the linear ``fn`` at ``primal``'s type to ``ct``.

  ``jax.linear_transpose`` rejects the manual-axis (varying) types used
  inside ``shard_map``; ``jax.vjp`` at a zero primal of exactly the operand's
  type does not, and XLA removes the unused primal computation.
  """
  manual = getattr(primal, "manual_axis_type", None)
  zero = jnp.zeros(primal.shape, primal.dtype)
  varying = tuple(sorted(getattr(manual, "varying", ()) or ()))
  if varying:
    zero = jax.lax.pcast(zero, varying, to="varying")
  _, vjp = jax.vjp(fn, zero)
  return vjp(ct)[0]


def match_varying(ct: jax.Array, manual) -> jax.Array:
  """``ct`` with the varying/invariant type of an operand of type ``manual``.

  Inside ``shard_map`` a cotangent computed from per-device data varies over
  the mesh axes; the cotangent of an operand invariant over some of them is
  the sum of the per-device contributions (what ``jax.grad`` returns for a
  replicated weight), so those axes are summed; axes the operand varies over
  but ``ct`` does not are cast to varying.
  """
  want = frozenset(getattr(manual, "varying", ()) or ())
  extra = tuple(sorted(vma.varying(ct) - want))
  if extra:
    ct = jax.lax.psum(ct, extra)
  missing = tuple(sorted(want - vma.varying(ct)))
  if missing:
    ct = jax.lax.pcast(ct, missing, to="varying")
  return ct


def check_float(name: str, x) -> None:
  """Raises ``TypeError`` unless ``x`` has a floating dtype."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{name} must have a floating dtype (float16, bfloat16, float32 or "
        f"float64) to be differentiated; got {dtype}.")


class Op:
  """Interface of a bilinear op (subclasses are frozen dataclasses).

  Subclasses define the fields ``lhs_shape``, ``lhs_dtype``, ``rhs_shape``,
  ``rhs_dtype`` (and optionally ``lhs_manual``, ``rhs_manual``), the
  properties :attr:`batch_axis` and :attr:`channel_axis`, and
  :meth:`apply`.

  Attributes:
    kind: ``"conv"``, ``"dot"`` or ``"bilinear"``: what the layer log and
      error messages call the op.
  """

  kind: ClassVar[str] = "bilinear"
  lhs_shape: tuple[int, ...]
  lhs_dtype: Any
  rhs_shape: tuple[int, ...]
  rhs_dtype: Any
  lhs_manual: Any = None
  rhs_manual: Any = None
  preferred_element_type: Any = None

  @property
  def batch_axis(self) -> int:
    """The axis of ``lhs`` that holds the batch."""
    return 0

  @property
  def channel_axis(self) -> int:
    """The axis of ``lhs`` that holds its features (contracted with rhs)."""
    return len(self.lhs_shape) - 1

  def lhs_aval(self) -> jax.ShapeDtypeStruct:
    """Abstract ``lhs`` (with its manual axis type inside ``shard_map``)."""
    return aval(self.lhs_shape, self.lhs_dtype, self.lhs_manual)

  def rhs_aval(self) -> jax.ShapeDtypeStruct:
    """Abstract ``rhs`` (with its manual axis type inside ``shard_map``)."""
    return aval(self.rhs_shape, self.rhs_dtype, self.rhs_manual)

  def apply(self, lhs, rhs, **overrides) -> jax.Array:
    """The exact forward pass."""
    raise NotImplementedError

  def out_dtype(self):
    """The output's dtype."""
    if self.preferred_element_type is not None:
      return self.preferred_element_type
    return jnp.result_type(self.lhs_dtype, self.rhs_dtype)

  def out_shape(self) -> tuple[int, ...]:
    """The output's shape (static)."""
    return jax.eval_shape(
        lambda l, r: self.apply(l, r, out_sharding=None),
        jax.ShapeDtypeStruct(self.lhs_shape, self.lhs_dtype),
        jax.ShapeDtypeStruct(self.rhs_shape, self.rhs_dtype)).shape

  def input_grad(self, rhs: jax.Array, g: jax.Array) -> jax.Array:
    """Exact ``d lhs``: the transpose of the op in ``lhs`` applied to ``g``.

    ``rhs`` must already be pinned to the backward pass (the custom VJP
    ties it after the weight gradient, or after ``g``): a transform of it (a
    flipped kernel) is otherwise hoisted into the forward pass and kept.
    Pinning here again, by a read of ``g``, would make XLA recompute ``g``'s
    elementwise producers for that read and keep their inputs alive.
    """
    return transpose(lambda l: self.apply(l, rhs), self.lhs_aval(),
                     g.astype(self.out_dtype()))

  def weight_grad(self, lhs: jax.Array, g: jax.Array) -> jax.Array:
    """``d rhs`` at the input ``lhs`` (the reference weight gradient)."""
    return transpose(lambda r: self.apply(lhs, r, out_sharding=None),
                     self.rhs_aval(), g.astype(self.out_dtype()))

  def tucker_weight_grad(self, res, g: jax.Array) -> jax.Array | None:
    """``d rhs`` from a :class:`TuckerResidual` without rebuilding ``lhs``.

    Returns None when the op has no such path (the caller then rebuilds).
    """
    del res, g
    return None
