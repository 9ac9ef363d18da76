"""Tests for lowrank_vjp._src.tensor.packing: small codes in uint32 words."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_vjp._src.tensor import packing

SIZES = [1, 3, 7, 31, 32, 33, 100]


@pytest.mark.parametrize("bits,size", [(1, 33), (2, 7), (4, 1), (8, 100),
                                       (8, 32)])
def test_pack_roundtrip(bits, size):
  codes = jax.random.randint(jax.random.PRNGKey(size), (size,), 0, 2**bits)
  words = packing.pack(codes, bits)
  assert words.dtype == jnp.uint32
  assert words.shape == (packing.packed_words(size, bits),)
  np.testing.assert_array_equal(packing.unpack(words, bits, (size,)), codes)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("shape", [(), (5,), (3, 7), (2, 3, 5), (4, 8)],
                         ids=str)
@pytest.mark.parametrize("bits", packing.BITS)
def test_roundtrip_any_shape_and_dtype(bits, shape, jit):
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2**bits, size=shape)
  pack = jax.jit(packing.pack, static_argnums=1) if jit else packing.pack
  unpack = (jax.jit(packing.unpack, static_argnums=(1, 2)) if jit
            else packing.unpack)
  for dtype in (jnp.uint8, jnp.int32, jnp.uint32):
    words = pack(jnp.asarray(codes, dtype), bits)
    assert words.dtype == jnp.uint32
    assert words.shape == (packing.packed_words(codes.size, bits),)
    back = unpack(words, bits, shape)
    assert back.dtype == jnp.uint32 and back.shape == shape
    np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("size", SIZES)
def test_boolean_mask_roundtrip(size):
  mask = np.random.default_rng(size).random(size) > 0.5
  words = packing.pack(jnp.asarray(mask), 1)
  assert words.shape == (math.ceil(size / 32),)
  np.testing.assert_array_equal(
      packing.unpack(words, 1, (size,)).astype(bool), mask)


@pytest.mark.parametrize("size", SIZES + [0])
@pytest.mark.parametrize("bits", packing.BITS)
def test_word_count_formula(bits, size):
  assert packing.packed_words(size, bits) == math.ceil(size * bits / 32)
  assert packing.packed_words(size, bits) == -(-size // (32 // bits))
  assert packing.packed_nbytes(size, bits) == 4 * math.ceil(size * bits / 32)
  if size:
    words = packing.pack(jnp.zeros((size,), jnp.uint32), bits)
    assert words.size * words.dtype.itemsize == packing.packed_nbytes(
        size, bits)


@pytest.mark.parametrize("bits", packing.BITS)
def test_bit_layout_low_bits_first(bits):
  """Code ``i`` sits in word ``i // (32 // bits)`` at bit ``bits · (i mod
  (32 // bits))``."""
  per_word = 32 // bits
  size = 2 * per_word + 3            # a partial last word
  codes = (np.arange(size) * 7 + 3) % 2**bits
  words = np.asarray(packing.pack(jnp.asarray(codes), bits))
  assert words.dtype == np.uint32
  want = np.zeros(math.ceil(size / per_word), np.uint64)
  for i, c in enumerate(codes):
    want[i // per_word] |= np.uint64(int(c) << (bits * (i % per_word)))
  np.testing.assert_array_equal(words, want.astype(np.uint32))
  # A single code at position i sets exactly its bits.
  for i in (0, 1, per_word - 1, per_word, size - 1):
    one = np.zeros(size, np.uint32)
    one[i] = 2**bits - 1
    w = np.asarray(packing.pack(jnp.asarray(one), bits))
    assert np.count_nonzero(w) == 1
    assert int(w[i // per_word]) == (2**bits - 1) << (bits * (i % per_word))


def test_padding_codes_are_zero():
  words = np.asarray(packing.pack(jnp.full((3,), 255, jnp.uint32), 8))
  assert words.tolist() == [0x00FFFFFF]   # the fourth lane is padding


@pytest.mark.parametrize("bits", [0, 3, 5, 16, 32, "8", None, True, 2.0])
def test_bad_bits_raise(bits):
  with pytest.raises(ValueError, match="bits"):
    packing.pack(jnp.zeros((8,), jnp.uint32), bits)
