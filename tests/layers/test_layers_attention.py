"""Blockwise dot-product attention (layers/attention.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv

B, T, S, N, K, H = 2, 7, 11, 4, 2, 8


def _qkv(seed=0, t=T, s=S, n=N, k=K, h=H, b=B):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (jax.random.normal(ks[0], (b, t, n, h)),
          jax.random.normal(ks[1], (b, s, k, h)),
          jax.random.normal(ks[2], (b, s, k, h)),
          jax.random.normal(ks[3], (b, t, n, h)))


def _grads(f, q, k, v, w, bias=None):
  """``f``'s output and its gradients, in one jitted program (op by op,
  the blockwise loop's every operation compiled on its own: seconds)."""
  args = (q, k, v) if bias is None else (q, k, v, bias)
  loss = lambda *a: jnp.sum(f(*a) * w)
  return jax.jit(lambda *a: (f(*a), jax.grad(loss, tuple(range(len(a))))(
      *a)))(*args)


MASK = jax.random.bernoulli(jax.random.PRNGKey(9), 0.7, (B, 1, T, S))


# S = 11 keys: blocks of 4 are two full blocks and a remainder of 3; 3 and
# 11 divide it otherwise; 512 is one block.
@pytest.mark.parametrize("kw,block", [
    ({}, 4), ({"is_causal": True}, 4), ({"mask": MASK}, 4),
    ({"mask": MASK, "is_causal": True}, 4),
    ({"mask": MASK, "is_causal": True}, 3),
    ({"mask": MASK, "is_causal": True}, 11),
    ({"mask": MASK, "is_causal": True}, 512)],
    ids=["plain", "causal", "mask", "mask+causal", "mask+causal-3",
         "mask+causal-11", "mask+causal-512"])
def test_equals_jax_attention(kw, block):
  q, k, v, w = _qkv()
  bias = jax.random.normal(jax.random.PRNGKey(5), (1, N, T, S))
  y0, g0 = _grads(lambda *a: jax.nn.dot_product_attention(
      *a[:3], bias=a[3], **kw), q, k, v, w, bias)
  y1, g1 = _grads(lambda *a: lv.dot_product_attention(
      *a[:3], bias=a[3], block_size=block, **kw), q, k, v, w, bias)
  np.testing.assert_allclose(y1, y0, atol=1e-6)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-5,
                               atol=1e-6 * float(jnp.max(jnp.abs(b))))


def test_fully_masked_query_averages_the_values_as_jax_does():
  q, k, v, w = _qkv()
  mask = jnp.ones((B, 1, T, S), bool).at[:, :, 2, :].set(False)
  y0, g0 = _grads(lambda *a: jax.nn.dot_product_attention(*a, mask=mask),
                  q, k, v, w)
  y1, g1 = _grads(lambda *a: lv.dot_product_attention(*a, mask=mask,
                                                      block_size=4),
                  q, k, v, w)
  np.testing.assert_allclose(y1, y0, atol=1e-6)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_unbatched_and_custom_scale():
  q, k, v, _ = _qkv()
  np.testing.assert_allclose(
      jax.jit(lambda q, k, v: lv.dot_product_attention(
          q, k, v, scale=0.3, block_size=4))(q[0], k[0], v[0]),
      jax.nn.dot_product_attention(q[0], k[0], v[0], scale=0.3), atol=1e-6)


def test_residual_holds_no_logits_sized_array():
  q, k, v, _ = _qkv(t=256, s=256, n=4, k=4, h=16, b=1)
  ours = lv.measure.vjp_residual_bytes(
      lambda q, k, v: lv.dot_product_attention(q, k, v, is_causal=True,
                                               block_size=64), q, k, v)
  jax_ = lv.measure.vjp_residual_bytes(
      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
      q, k, v)
  qkv = q.nbytes + k.nbytes + v.nbytes
  probs = 1 * 4 * 256 * 256 * 4
  assert ours <= qkv + 2 * 4 * 256 * 4 * 2   # q, k, v and m, l per query
  assert jax_ >= qkv + probs                 # jax.nn keeps the [T, S] ones


def test_backward_temp_is_blocks_not_logits():
  q, k, v, _ = _qkv(t=512, s=512, n=4, k=4, h=16, b=1)
  spec = jax.ShapeDtypeStruct(q.shape, q.dtype)
  grad = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v))))
  ours = lv.measure.xla_memory(grad(lambda *a: lv.dot_product_attention(
      *a, block_size=64)), spec, spec, spec)
  logits = 4 * 512 * 512 * 4
  assert ours.temp_bytes < logits / 2, ours.temp_bytes / logits


def test_compressed_q_k_v():
  q, k, v, w = _qkv(t=32, s=32)
  _, g0 = _grads(lv.dot_product_attention, q, k, v, w)
  rel = lambda gs: [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
                    for a, b in zip(gs, g0)]
  # HOSVD at ε = 1 keeps everything: JAX's gradients to round-off.
  _, g1 = _grads(lambda *a: lv.dot_product_attention(
      *a, method=lv.methods.Hosvd(eps=1.0)), q, k, v, w)
  assert max(rel(g1)) < 1e-5
  # 8-bit codes of Gaussian q, k, v: about 5 % (mostly the values beyond
  # the coded ±3σ range, which are clipped).
  _, g8 = _grads(lambda *a: lv.dot_product_attention(
      *a, method=lv.methods.Quant(per_channel=True)), q, k, v, w)
  assert all(0 < e < 0.1 for e in rel(g8)), rel(g8)
  res = lv.measure.vjp_residual_bytes(
      lambda *a: lv.dot_product_attention(*a, method="quant"), q, k, v)
  softmax_stats = 2 * B * N * 32 * 4            # m and l per query
  assert res <= (q.nbytes + k.nbytes + v.nbytes) / 4 + softmax_stats + 64


@pytest.mark.parametrize("causal", [False, True])
def test_coded_q_k_of_large_logits_give_finite_gradients(causal):
  """Rebuilt q, k give logits above the forward's row maximum; normalised
  by the forward's maximum and sum, exp overflowed and the gradients were
  NaN (a GPT trained with q/k/v codes diverged at step 167). The backward
  now takes the softmax statistics of the rebuilt logits."""
  q, k, v, w = _qkv(t=32, s=32, h=64)
  q, k = 100.0 * q, 100.0 * k          # logits of order 10^4
  f = lambda *a: lv.dot_product_attention(
      *a, is_causal=causal, method=lv.methods.Quant(per_channel=True))
  _, grads = _grads(f, q, k, v, w)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  # The value gradient is Pᵀ·dO with P a softmax of the rebuilt logits:
  # its column sums are dO's, as for the exact P.
  np.testing.assert_allclose(grads[2].sum(1), w.reshape(
      B, 32, K, N // K, 64).sum((1, 3)), rtol=1e-4, atol=1e-3)


def test_bad_arguments_are_named():
  q, k, v, _ = _qkv()
  with pytest.raises(ValueError, match="multiple of key heads"):
    lv.dot_product_attention(q[:, :, :3], k, v)
  with pytest.raises(ValueError, match=r"must broadcast to \[batch, heads"):
    lv.dot_product_attention(q, k, v, bias=jnp.zeros((T, S + 1)))
  with pytest.raises(ValueError, match="mask must be boolean"):
    lv.dot_product_attention(q, k, v, mask=jnp.ones((T, S)))
  with pytest.raises(ValueError, match="stateful"):
    lv.dot_product_attention(q, k, v, method="asi")
  with pytest.raises(ValueError, match="convolutions only"):
    lv.dot_product_attention(q, k, v, method="gradfilter")
  with pytest.raises(ValueError, match="block_size"):
    lv.dot_product_attention(q, k, v, block_size=0)
  with pytest.raises(TypeError, match="floating"):
    lv.dot_product_attention(q.astype(jnp.int32), k, v)
