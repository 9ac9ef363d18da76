"""Mixed precision for an NNX model: one compute dtype, float32 parameters.

The NNX counterpart of :func:`lowrank_vjp.flax.compute_dtype`. NNX layers
keep their compute dtype as an attribute, so it is set once on the model
(it becomes part of the graph that ``nnx.split`` returns) rather than
around each call.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from lowrank_vjp._src.flax.precision import canonical_dtype


def set_compute_dtype(model: nnx.Module, dtype: Any) -> list[str]:
  """Every layer of ``model`` whose ``dtype`` is None computes in ``dtype``.

  ``nnx.Conv``, ``nnx.Linear``, ``nnx.BatchNorm``, ``nnx.LayerNorm``, … (any
  module with a ``dtype`` attribute left at None, NNX's "promote the
  inputs") get ``dtype``; parameters keep their ``param_dtype`` and
  BatchNorm statistics stay float32 (NNX reduces them in float32). A layer
  whose ``dtype`` is set keeps it. Cast the model's input to ``dtype`` too,
  and the logits back to float32 for the loss.

  Args:
    model: The NNX model, changed in place.
    dtype: ``float32``, ``bfloat16`` or ``float16``; None or float32 changes
      nothing.

  Returns:
    The ``/``-joined paths of the layers changed.

  Raises:
    ValueError: for another dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> set_compute_dtype(layer, jnp.bfloat16)
    ['']
    >>> layer(jnp.ones((2, 4))).dtype, layer.kernel.dtype
    (dtype(bfloat16), dtype('float32'))
  """
  dtype = canonical_dtype(dtype)
  if dtype is None or dtype == jnp.float32:
    return []
  changed = []
  for path, module in nnx.iter_graph(model):
    if (isinstance(module, nnx.Module) and "dtype" in vars(module)
        and module.dtype is None):
      module.dtype = dtype
      changed.append("/".join(map(str, path)))
  return changed
