"""Activations whose saved residual is a bit-packed mask.

``jax.nn.relu``'s gradient rule makes XLA keep the float pre-activation (or a
byte mask it can fuse back into it) until the backward pass, which keeps a
compressed convolution's output alive at full size. These versions save one
bit per element, packed eight to a byte with ``jnp.packbits``; that packing
survives XLA's fusion (measured, see docs/memory.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pack(mask: jax.Array) -> jax.Array:
  return jnp.packbits(mask.reshape(-1))


def _unpack(packed: jax.Array, like: jax.Array) -> jax.Array:
  bits = jnp.unpackbits(packed, count=like.size)
  return bits.reshape(like.shape).astype(bool)


@jax.custom_vjp
def relu(x: jax.typing.ArrayLike) -> jax.Array:
  """``max(x, 0)``, saving a 1-bit mask for the backward pass.

  Args:
    x: Any shape, floating dtype.

  Returns:
    ``max(x, 0)``, same shape and dtype. The gradient is ``g · [x > 0]``
    (0 at ``x = 0``, as ``jax.nn.relu``); the residual is
    ``ceil(x.size / 8)`` bytes.

  Example::

    y = lv.relu(conv(x, w, (1, 1), "SAME"))
  """
  return jnp.maximum(x, 0)


def _relu_fwd(x):
  return jnp.maximum(x, 0), _pack(x > 0)


def _relu_bwd(packed, g):
  return (jnp.where(_unpack(packed, g), g, jnp.zeros_like(g)),)


relu.defvjp(_relu_fwd, _relu_bwd)


@jax.custom_vjp
def relu6(x: jax.typing.ArrayLike) -> jax.Array:
  """``min(max(x, 0), 6)``, saving a 1-bit mask for the backward pass.

  Args:
    x: Any shape, floating dtype.

  Returns:
    ``clip(x, 0, 6)``. The gradient is ``g · [0 < x < 6]`` (as
    ``jax.nn.relu6``); the residual is ``ceil(x.size / 8)`` bytes.
  """
  return jnp.clip(x, 0, 6)


def _relu6_fwd(x):
  return jnp.clip(x, 0, 6), _pack((x > 0) & (x < 6))


relu6.defvjp(_relu6_fwd, _relu_bwd)
