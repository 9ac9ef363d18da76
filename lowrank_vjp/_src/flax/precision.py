"""Mixed precision for any Linen model: one compute dtype, float32 parameters.

Flax layers take a ``dtype`` (what they compute in) apart from their
``param_dtype`` (what their parameters are stored in): ``nn.Conv(dtype=
jnp.bfloat16)`` casts its input and float32 kernel to bfloat16 before the
contraction, and ``nn.BatchNorm(dtype=jnp.bfloat16)`` reduces its
statistics in float32, keeps its running averages in float32 and returns
bfloat16. :func:`compute_dtype` sets that field on every layer called inside
it that leaves it unset, so a model written without dtypes trains in mixed
precision without being rewritten, and gradients reach the float32
parameters through the casts (the cast's transpose casts back).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

#: The compute dtypes :func:`compute_dtype` accepts.
DTYPES = ("float32", "bfloat16", "float16")


def canonical_dtype(dtype: Any, name: str = "dtype") -> jnp.dtype | None:
  """``dtype`` as a NumPy dtype, checked; None stays None.

  Raises:
    ValueError: when ``dtype`` is not one of :data:`DTYPES`.
  """
  if dtype is None:
    return None
  try:
    value = jnp.dtype(dtype)
  except TypeError:
    value = None
  if value is None or value.name not in DTYPES:
    raise ValueError(f"{name} must be one of {', '.join(DTYPES)} (or None), "
                     f"got {dtype!r}")
  return value


def _has_dtype_field(module: nn.Module) -> bool:
  return any(f.name == "dtype" for f in dataclasses.fields(module))


@contextlib.contextmanager
def compute_dtype(dtype: Any) -> Iterator[None]:
  """Every Linen layer called inside computes in ``dtype``.

  Sets the ``dtype`` field of each module whose ``dtype`` is None (Flax's
  default: "promote the inputs") for the duration of its call. A layer
  whose ``dtype`` is set keeps it (e.g. a head kept in float32 on purpose),
  parameters keep their ``param_dtype``, and the model's own code is not
  changed. Cast the model's input to ``dtype`` too, and the logits back to
  float32 for the loss.

  Args:
    dtype: ``float32``, ``bfloat16`` or ``float16``; None or float32 changes
      nothing.

  Raises:
    ValueError: for another dtype.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> model = nn.Dense(3)
    >>> v = model.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> with compute_dtype(jnp.bfloat16):
    ...   y = model.apply(v, jnp.ones((2, 4), jnp.bfloat16))
    >>> y.dtype, v["params"]["kernel"].dtype
    (dtype(bfloat16), dtype('float32'))
  """
  dtype = canonical_dtype(dtype)
  if dtype is None or dtype == jnp.float32:
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not _has_dtype_field(module)
        or module.dtype is not None):
      return next_fun(*args, **kwargs)
    object.__setattr__(module, "dtype", dtype)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, "dtype", None)

  with nn.intercept_methods(interceptor):
    yield
