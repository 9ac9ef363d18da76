"""Packing small unsigned codes into ``uint32`` words.

A residual of 1-, 2-, 4- or 8-bit codes is only smaller in memory if XLA
keeps the packed words and not the unpacked codes. Packing by a reduction
(shift each code to its place in the word and sum) is the form that survived
XLA's fusion and scheduling on the CPU; a plain ``int8``/``bool`` array, or
``jnp.packbits``, was fused back into its producer or kept at 4× the packed
size (docs/memory.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

WORD_BITS = 32
BITS = (1, 2, 4, 8)
"""Code widths that divide a 32-bit word."""


def packed_words(size: int, bits: int) -> int:
  """Number of ``uint32`` words holding ``size`` codes of ``bits`` bits."""
  return math.ceil(size * bits / WORD_BITS)


def packed_nbytes(size: int, bits: int) -> int:
  """Bytes of :func:`pack`'s output: ``4 · ceil(size · bits / 32)``."""
  return 4 * packed_words(size, bits)


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs codes in ``[0, 2**bits)`` into ``uint32`` words, low bits first.

  Args:
    codes: Any shape, integer or boolean dtype, values below ``2**bits``.
    bits: 1, 2, 4 or 8.

  Returns:
    ``uint32[ceil(codes.size * bits / 32)]``: code ``i`` of the flattened
    array sits in word ``i // (32 // bits)`` at bit ``bits · (i mod (32 //
    bits))``.
  """
  if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
    raise ValueError(f"bits must be one of {BITS}, got {bits!r}.")
  per_word = WORD_BITS // bits
  flat = codes.reshape(-1)
  flat = jnp.pad(flat, (0, -flat.size % per_word))
  lanes = flat.reshape(-1, per_word).astype(jnp.uint32)
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(bits)
  return jnp.sum(lanes << shifts, axis=1, dtype=jnp.uint32)


def unpack(words: jax.Array, bits: int, shape) -> jax.Array:
  """Inverse of :func:`pack`: ``uint32`` codes of the given ``shape``."""
  per_word = WORD_BITS // bits
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(bits)
  mask = jnp.uint32((1 << bits) - 1)
  codes = (words[:, None] >> shifts) & mask
  size = math.prod(shape)
  return codes.reshape(-1)[:size].reshape(shape)
