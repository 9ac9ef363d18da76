"""The NNX variable types the compressed layers keep their records in."""

from __future__ import annotations

from flax import nnx


class Compression(nnx.Variable):
  """A compressed layer's :class:`lowrank_vjp.CompressionStats`.

  Written by every call of the layer (the value of its last call; None
  before the first). It is neither a parameter nor differentiated: read it
  with :func:`lowrank_vjp.nnx.stats`, or filter it out with
  ``nnx.state(model, lowrank_vjp.nnx.Compression)``.
  """


class MethodState(nnx.Variable):
  """A stateful method's state between steps (ASI's warm-start factors).

  The value is ``{field: array}`` (for ASI ``{"factors": {axis: [I, K]},
  "started": bool[]}``), plain arrays that Orbax saves and restores like the
  rest of the model's state; None before the layer first ran (or before
  :func:`lowrank_vjp.nnx.apply` was given an example input).
  """
