"""Activations whose saved residual is a bit-packed mask.

``jax.nn.relu``'s gradient rule makes XLA keep the float pre-activation (or a
byte mask it can fuse back into it) until the backward pass, which keeps a
compressed convolution's output alive at full size. These versions save one
bit per element, packed 32 to a ``uint32`` word by a reduction; that packing
survives XLA's fusion and scheduling (measured, see docs/memory.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


_WORD = 32


def _pack(mask: jax.Array) -> jax.Array:
  """Packs a boolean mask into ``uint32`` words, 32 elements per word.

  The words come out of a reduction, the last op before the residual: with
  ``jnp.packbits`` XLA kept the pre-``convert`` ``uint32`` array (4× the
  packed bytes) and converted it to ``uint8`` in the backward pass.
  """
  flat = mask.reshape(-1)
  flat = jnp.pad(flat, (0, -flat.size % _WORD))
  bits = flat.reshape(-1, _WORD).astype(jnp.uint32)
  shifts = jnp.arange(_WORD, dtype=jnp.uint32)
  return jnp.sum(bits << shifts, axis=1, dtype=jnp.uint32)


def _unpack(packed: jax.Array, like: jax.Array) -> jax.Array:
  shifts = jnp.arange(_WORD, dtype=jnp.uint32)
  bits = (packed[:, None] >> shifts) & jnp.uint32(1)
  return bits.reshape(-1)[:like.size].reshape(like.shape).astype(bool)


@jax.custom_vjp
def relu(x: jax.typing.ArrayLike) -> jax.Array:
  """``max(x, 0)``, saving a 1-bit mask for the backward pass.

  Args:
    x: Any shape, floating dtype.

  Returns:
    ``max(x, 0)``, same shape and dtype. The gradient is ``g · [x > 0]``
    (0 at ``x = 0``, as ``jax.nn.relu``); the residual is
    ``4 · ceil(x.size / 32)`` bytes.

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
    ``jax.nn.relu6``); the residual is ``4 · ceil(x.size / 32)`` bytes.
  """
  return jnp.clip(x, 0, 6)


def _relu6_fwd(x):
  return jnp.clip(x, 0, 6), _pack((x > 0) & (x < 6))


relu6.defvjp(_relu6_fwd, _relu_bwd)
