"""Scheduling pins: when XLA computes a residual, and when it rebuilds one.

XLA places each computation wherever its data dependencies allow. Two
placements undo a compression: computing the residual late (in the backward
pass, with the full input kept alive until then), and rebuilding an
activation early (in the forward pass, with the rebuilt tensor kept alive
until the backward pass). :func:`tie` and :func:`after` add data
dependencies that forbid each, without changing any value. A third undoes
it across layers: XLA recomputing a cheap producer in each consumer, which
keeps the producer's inputs alive; :func:`computed_once` forbids that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _never(words) -> jax.Array:
  """A predicate XLA cannot prove false that is never true.

  A 32-bit word has at most 32 set bits.
  """
  bits = sum(jax.lax.population_count(w) for w in words)
  return bits > 32 * len(words)


def _word(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def tie(y: jax.Array, res) -> jax.Array:
  """Returns ``y`` unchanged, made to depend on every array of ``res``.

  XLA schedules a residual's computation wherever it likes before its first
  use, which is in the backward pass; it was seen postponing the last
  contractions of a Tucker core there and keeping a larger intermediate (or
  the input itself) alive in its place. ``lax.optimization_barrier`` does not
  prevent this on the CPU, whose pipeline removes barriers early. Here ``y``
  passes through a select whose predicate reads a reduction of every
  residual array and is never true, so the residual must exist before ``y``
  is used, and ``y``'s values, NaNs included, are untouched.

  Args:
    y: The primal output.
    res: A pytree of arrays to compute no later than ``y``.

  Returns:
    ``y``, same values.
  """
  leaves = [l for l in jax.tree_util.tree_leaves(res) if l.size]
  if not leaves:
    return y
  never = _never([_word(jnp.max(l)) for l in leaves])
  return jnp.where(never, jnp.zeros_like(y), y)


def after(x: jax.Array, g: jax.Array) -> jax.Array:
  """Returns ``x`` unchanged, made to depend on the cotangent ``g``.

  Work in a backward rule that reads only residuals (rebuilding part of an
  activation, flipping a kernel) can otherwise be hoisted by XLA into the
  forward pass, where its larger result is then kept alive until the backward
  pass. One element of ``g`` is enough to pin it after ``g`` exists.

  Args:
    x: Array computed from residuals only.
    g: The incoming cotangent.

  Returns:
    ``x``, same values.
  """
  if not g.size:
    return x
  first = jax.lax.slice(g.reshape(-1), (0,), (1,))[0]
  # The never-taken branch reads g too: with zeros there, an ``x`` of zeros
  # (a loop's starting carry) would make both branches equal, and XLA would
  # fold the select and the pin away.
  return jnp.where(_never([_word(first)]),
                   jnp.full(x.shape, first).astype(x.dtype), x)


def computed_once(x: jax.Array) -> jax.Array:
  """Returns ``x`` unchanged, computed into one buffer that every reader shares.

  XLA fuses a cheap elementwise producer into each consumer it can, and
  materializes it separately for those it cannot (a convolution), so a
  tensor read whole by one op and reshaped by another (a contraction's
  matrix view) is computed twice, and the producer's own input stays alive
  for both. XLA does not duplicate an expensive op: here ``x`` is divided
  by one (:func:`divided_once`). Every value is kept, NaN, infinities and
  signed zeros included; subnormals may be flushed to zero, as XLA:CPU
  flushes them in every arithmetic op.

  Args:
    x: An array, typically a cotangent (returned as is unless floating).

  Returns:
    ``x``, same values.
  """
  if not x.size or not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  return divided_once(x, jnp.ones((), x.dtype))


def divided_once(x: jax.Array, divisor: jax.Array) -> jax.Array:
  """``x / divisor`` for a scalar ``divisor``, computed once for all readers.

  A division is an op XLA counts as expensive and does not duplicate into
  its consumers, but XLA rewrites a division by a broadcast scalar into a
  product by its reciprocal, which is cheap and then copied into every
  consumer's fusion (each reading ``x`` in its own shape holds a copy of the
  result). Here the divisor is made elementwise, from ``x``'s own bits (a
  word has no more set bits than its width), so that XLA can neither fold
  it nor turn it into a reciprocal.

  Args:
    x: A floating-point array.
    divisor: A scalar of ``x``'s dtype.

  Returns:
    ``x / divisor``, exactly as the plain division, and differentiable as
    it (a bit cast alone would carry no tangent: a second-order derivative
    through the custom VJP's ``computed_once(g)`` came out zero).
  """
  divisor = jnp.asarray(divisor).astype(x.dtype)
  return _divided_once(x, divisor)


@jax.custom_jvp
def _divided_once(x, divisor):
  bits = jnp.dtype(x.dtype).itemsize * 8
  word = jax.lax.bitcast_convert_type(x, jnp.dtype(f"int{bits}"))
  count = jax.lax.population_count(word)
  # The numerator passes through its own bits (flipped where a word would
  # have more set bits than it has: never). XLA rewrites ``(a / b) / c``
  # into ``a / (b·c)``, and HOSVD's scaled copy of a computed_once ReLU6
  # output then read the ReLU6's input again, which stayed alive beside
  # the output (MobileNetV2's first expansion, 147 MiB at batch 32).
  numerator = jax.lax.bitcast_convert_type(
      word ^ (count > bits).astype(word.dtype), x.dtype)
  return numerator / jnp.where(count > bits, 2 * divisor, divisor)


@_divided_once.defjvp
def _divided_once_jvp(primals, tangents):
  x, divisor = primals
  dx, ddivisor = tangents
  y = _divided_once(x, divisor)
  return y, (dx - y * ddivisor) / divisor
