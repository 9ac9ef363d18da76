"""Dot-product attention whose backward pass keeps no ``[T, S]`` tensor.

``jax.nn.dot_product_attention`` (its XLA path) keeps the probabilities
``[batch, heads, T, S]`` for the backward pass, and its forward pass builds
the logits at that size. Here both passes run over blocks of keys, in the
manner of FlashAttention (Dao et al., NeurIPS 2022): the forward pass keeps
a running maximum ``m`` and sum ``l`` per query (an online softmax) and
saves both; the backward pass recomputes each block's probabilities
``P = exp(s - m) / l`` from ``q``, ``k``, ``m`` and ``l``. With
``dP = dO · vᵀ`` and ``D = rowsum(P ∘ dP)`` (a first pass over the blocks,
so that the output ``O`` need not be kept)::

  dS = P ∘ (dP - D)      dq = scale · dS · k      dk = scale · dSᵀ · q
  dv = Pᵀ · dO           dbias = dS

What is saved: ``q``, ``k``, ``v``, ``m`` and ``l`` — or, with a
``method``, that method's residuals of ``q``, ``k`` and ``v``: every
gradient is then taken at the rebuilt ones, and one more pass over the
blocks recomputes ``m`` and ``l`` from them (the forward's would not
normalise the rebuilt logits, and could overflow ``exp``). The largest
intermediate of either pass is one block, ``[batch, heads, T,
block_size]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank_vjp._src import remat
from lowrank_vjp._src import schedule
from lowrank_vjp._src.methods import base as methods_base
from lowrank_vjp._src.ops import base

DEFAULT_BLOCK = 512
"""Keys per block."""


@dataclasses.dataclass(frozen=True)
class Operand(base.Op):
  """One of ``q``, ``k``, ``v`` (``[B, T, heads, head_dim]``) as a method
  sees it: batch axis 0, features (``head_dim``) last, kind ``"attention"``.
  """

  lhs_shape: tuple[int, ...]
  lhs_dtype: Any
  rhs_shape: tuple[int, ...] = ()
  rhs_dtype: Any = jnp.float32
  lhs_manual: Any = None
  rhs_manual: Any = None

  kind = "attention"

  def apply(self, lhs, rhs, **overrides):
    raise NotImplementedError("attention operands are not contracted alone")


@dataclasses.dataclass(frozen=True)
class _Spec:
  scale: float
  is_causal: bool
  block: int
  method: methods_base.Method | None
  q: Operand
  k: Operand
  v: Operand
  bias_shape: tuple[int, ...] | None
  bias_dtype: Any
  mask_shape: tuple[int, ...] | None

  @property
  def groups(self) -> int:
    return self.q.lhs_shape[2] // self.k.lhs_shape[2]


def _large_negative():
  return jnp.float32(-0.7 * float(np.finfo(np.float32).max))


def _grouped(spec: _Spec, a):
  """``[b, n, T, S]`` (``n`` = 1 or N) as ``[b, K|1, G|1, T, S]``."""
  b, n, t, s = a.shape
  if n == 1:
    return a.reshape(b, 1, 1, t, s)
  kh = spec.k.lhs_shape[2]
  return a.reshape(b, kh, n // kh, t, s)


def _block_of(a, start, size, axis):
  """``size`` entries of ``a`` from ``start`` along ``axis`` (or all of a
  broadcast axis of length 1)."""
  if a.shape[axis] == 1:
    return a
  return lax.dynamic_slice_in_dim(a, start, size, axis)


def _logits(spec: _Spec, qg, kb, bias, mask, start, size):
  """Scaled, biased, masked logits of one key block and where they count."""
  s = jnp.einsum("btkgh,bskh->bkgts", qg, kb,
                 preferred_element_type=jnp.float32)
  s = s * jnp.float32(spec.scale)
  if bias is not None:
    s = s + _grouped(spec, _block_of(bias, start, size, 3)).astype(
        jnp.float32)
  t = qg.shape[1]
  valid = None
  if mask is not None:
    valid = _grouped(spec, _block_of(mask, start, size, 3))
  if spec.is_causal:
    rows = lax.broadcasted_iota(jnp.int32, (t, size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (t, size), 1) + start
    causal = cols <= rows
    valid = causal if valid is None else valid & causal
  if valid is not None:
    s = jnp.where(valid, s, _large_negative())
  return s, valid


def _blocks(spec: _Spec):
  """``(starts of the full blocks, their size, (start, size) of the rest)``."""
  s = spec.k.lhs_shape[1]
  size = min(spec.block, s)
  full = s // size
  rest = s - full * size
  return full, size, ((full * size, rest) if rest else None)


def _over_blocks(spec: _Spec, step, carry):
  """``carry = step(carry, start, size)`` over the key blocks, in order."""
  full, size, rest = _blocks(spec)
  if full == 1:
    carry = step(carry, 0, size)
  else:
    carry, _ = lax.scan(lambda c, i: (step(c, i * size, size), None), carry,
                        jnp.arange(full))
  if rest is not None:
    carry = step(carry, *rest)
  return carry


def _initial_stats(qg):
  """The running maximum and sum before the first key block."""
  b, t, kh, g, _ = qg.shape
  return (jnp.full((b, kh, g, t), -jnp.inf, jnp.float32),
          jnp.zeros((b, kh, g, t), jnp.float32))


def _row_stats(spec: _Spec, qg, k, bias, mask):
  """The softmax's maximum and sum per query, over every key block."""
  def step(carry, start, size):
    m, l = carry
    kb = lax.dynamic_slice_in_dim(k, start, size, 1)
    s, _ = _logits(spec, qg, kb, bias, mask, start, size)
    m_new = jnp.maximum(m, s.max(-1))
    return m_new, l * jnp.exp(m - m_new) + jnp.exp(
        s - m_new[..., None]).sum(-1)

  return _over_blocks(spec, step, _initial_stats(qg))


def _forward(spec: _Spec, q, k, v, bias, mask):
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)
  m0, l0 = _initial_stats(qg)
  acc0 = jnp.zeros((b, t, kh, n // kh, v.shape[-1]), jnp.float32)

  def step(carry, start, size):
    m, l, acc = carry
    kb = lax.dynamic_slice_in_dim(k, start, size, 1)
    vb = lax.dynamic_slice_in_dim(v, start, size, 1)
    s, _ = _logits(spec, qg, kb, bias, mask, start, size)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    l = l * alpha + p.sum(-1)
    pv = jnp.einsum("bkgts,bskh->btkgh", p.astype(v.dtype), vb,
                    preferred_element_type=jnp.float32)
    acc = acc * jnp.moveaxis(alpha, 3, 1)[..., None] + pv
    return m_new, l, acc

  m, l, acc = _over_blocks(spec, step, (m0, l0, acc0))
  out = acc / jnp.moveaxis(l, 3, 1)[..., None]
  # The maximum and the sum apart, not log-sum-exp m + log l: for a fully
  # masked query m is -0.7 · float32 max, which absorbs log l.
  return out.reshape(b, t, n, v.shape[-1]).astype(q.dtype), (m, l)


def _residual(spec: _Spec, q, k, v):
  if spec.method is None:
    return (q, k, v), None
  out, stats = [], []
  for op, x in ((spec.q, q), (spec.k, k), (spec.v, v)):
    r, st, _ = spec.method.compress_for(op, lax.stop_gradient(x), None)
    out.append(r)
    stats.append(st)
  return tuple(out), tuple(stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(spec: _Spec, q, k, v, bias, mask):
  out, _ = _forward(spec, q, k, v, bias, mask)
  return out, _residual(spec, q, k, v)[1]


def _attention_fwd(spec, q, k, v, bias, mask):
  out, softmax = _forward(spec, q, k, v, bias, mask)
  res, stats = _residual(spec, q, k, v)
  res = remat.named(res)
  out = schedule.tie(out, res)
  return (out, stats), (res, remat.named(softmax), bias, mask)


def _reduce_to(x, shape):
  """Sums ``x`` over the axes where ``shape`` has 1 (broadcast ones)."""
  axes = tuple(a for a, (d, e) in enumerate(zip(shape, x.shape))
               if d == 1 and e != 1)
  return x.sum(axes, keepdims=True) if axes else x


def _attention_bwd(spec, saved, cotangents):
  res, (m, l), bias, mask = saved
  g = cotangents[0]
  res = jax.tree_util.tree_map(lambda r: schedule.after(r, g), res)
  if spec.method is None:
    q, k, v = res
  else:
    q, k, v = (spec.method.rebuild(op, r)
               for op, r in zip((spec.q, spec.k, spec.v), res))
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)
  dog = g.reshape(b, t, kh, n // kh, v.shape[-1]).astype(v.dtype)
  if spec.method is not None:
    # Rebuilt q and k give other logits than the forward's: normalising them
    # by the forward's maximum and sum would not be a softmax, and a logit
    # above that maximum overflowed exp (NaN gradients with 8-bit codes of
    # large q, k). One more pass gives the rebuilt logits' own statistics.
    m, l = _row_stats(spec, qg, k, bias, mask)

  def probs(start, size):
    kb = lax.dynamic_slice_in_dim(k, start, size, 1)
    vb = lax.dynamic_slice_in_dim(v, start, size, 1)
    s, valid = _logits(spec, qg, kb, bias, mask, start, size)
    p = jnp.exp(s - m[..., None]) / l[..., None]
    dp = jnp.einsum("btkgh,bskh->bkgts", dog, vb,
                    preferred_element_type=jnp.float32)
    return kb, p, dp, valid

  over_blocks = functools.partial(_over_blocks, spec)

  def row_dot(d, start, size):
    _, p, dp, _ = probs(start, size)
    return d + (p * dp).sum(-1)

  d = over_blocks(row_dot, jnp.zeros(m.shape, jnp.float32))

  scale = jnp.float32(spec.scale)
  dbias0 = (None if spec.bias_shape is None
            else jnp.zeros(spec.bias_shape, jnp.float32))

  def grads(carry, start, size):
    dq, dk, dv, dbias = carry
    kb, p, dp, valid = probs(start, size)
    ds = p * (dp - d[..., None])
    if valid is not None:
      ds = jnp.where(valid, ds, 0.0)
    dq = dq + jnp.einsum("bkgts,bskh->btkgh", ds, kb.astype(jnp.float32)
                         ) * scale
    dkb = jnp.einsum("bkgts,btkgh->bskh", ds, qg.astype(jnp.float32)) * scale
    dvb = jnp.einsum("bkgts,btkgh->bskh", p, dog.astype(jnp.float32))
    dk = lax.dynamic_update_slice_in_dim(dk, dkb, start, 1)
    dv = lax.dynamic_update_slice_in_dim(dv, dvb, start, 1)
    if dbias is not None:
      blk = ds.reshape(ds.shape[0], -1, *ds.shape[3:])    # [B, N, T, size]
      blk = _reduce_to(blk, spec.bias_shape)
      if spec.bias_shape[3] == 1:
        dbias = dbias + blk
      else:
        dbias = lax.dynamic_update_slice_in_dim(dbias, blk, start, 3)
    return dq, dk, dv, dbias

  carry = (jnp.zeros(qg.shape, jnp.float32),
           jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
           dbias0)
  dq, dk, dv, dbias = over_blocks(grads, carry)
  dq = base.match_varying(dq.reshape(b, t, n, h).astype(spec.q.lhs_dtype),
                          spec.q.lhs_manual)
  dk = base.match_varying(dk.astype(spec.k.lhs_dtype), spec.k.lhs_manual)
  dv = base.match_varying(dv.astype(spec.v.lhs_dtype), spec.v.lhs_manual)
  if dbias is not None:
    dbias = dbias.astype(spec.bias_dtype)
  return dq, dk, dv, dbias, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _as_4d(name, a, b, n, t, s):
  if a is None:
    return None
  a = jnp.asarray(a)
  if a.ndim > 4:
    raise ValueError(f"dot_product_attention: {name} must broadcast to "
                     f"[batch, heads, T, S] = {(b, n, t, s)}; got shape "
                     f"{a.shape}.")
  a = a.reshape((1,) * (4 - a.ndim) + a.shape)
  for got, want in zip(a.shape, (b, n, t, s)):
    if got not in (1, want):
      raise ValueError(f"dot_product_attention: {name} must broadcast to "
                       f"[batch, heads, T, S] = {(b, n, t, s)}; got shape "
                       f"{a.shape}.")
  return a


def dot_product_attention(query: jax.typing.ArrayLike,
                          key: jax.typing.ArrayLike,
                          value: jax.typing.ArrayLike,
                          bias: jax.typing.ArrayLike | None = None,
                          mask: jax.typing.ArrayLike | None = None, *,
                          scale: float | None = None, is_causal: bool = False,
                          method: Any = None,
                          block_size: int = DEFAULT_BLOCK) -> jax.Array:
  """``jax.nn.dot_product_attention`` whose backward keeps no ``[T, S]`` array.

  Same layout and values as ``jax.nn.dot_product_attention`` (float32
  softmax, masked logits set to ``-0.7 · float32 max``, so a fully masked
  query averages every value, as there); gradients to float32 round-off.
  Both passes run over blocks of ``block_size`` keys.

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]``; ``N`` must be a multiple of ``K`` (grouped-query
      attention).
    value: ``[B, S, K, H_v]``.
    bias: Added to the logits; broadcastable to ``[B, N, T, S]``;
      differentiated.
    mask: Boolean, broadcastable to ``[B, N, T, S]``; False drops a logit.
    scale: Logit scale; ``1 / sqrt(H)`` by default.
    is_causal: Query ``t`` sees keys ``s <= t``.
    method: None (exact; keeps ``q``, ``k``, ``v`` themselves), or a
      stateless :class:`lowrank_vjp.methods.Method` or shorthand whose
      residuals of ``q``, ``k``, ``v`` are kept instead (every gradient is
      then taken at the rebuilt ones: docs/methods.md gives the errors).
    block_size: Keys per block (the largest intermediate is
      ``[B, N, T, block_size]`` float32).

  Returns:
    ``[B, T, N, H_v]`` in ``query``'s dtype.

  Raises:
    ValueError: for shapes that do not fit, a stateful method or a method
      that does not apply (``"gradfilter"``).

  Example::

    y = lv.dot_product_attention(q, k, v, is_causal=True)
  """
  q, k, v = (jnp.asarray(a) for a in (query, key, value))
  squeeze = q.ndim == 3
  if squeeze:
    q, k, v = q[None], k[None], v[None]
  for name, a in (("query", q), ("key", k), ("value", v)):
    base.check_float(name, a)
    if a.ndim != 4:
      raise ValueError(f"dot_product_attention: {name} must be [B, T, N, H] "
                       f"(or [T, N, H]); got shape {a.shape}.")
  b, t, n, h = q.shape
  if k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"dot_product_attention: key {k.shape} must be [B, S, "
                     f"K, H] with query's B = {b} and H = {h}.")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"dot_product_attention: value {v.shape} must match "
                     f"key {k.shape} in B, S and K.")
  if n % k.shape[2]:
    raise ValueError(f"dot_product_attention: query heads ({n}) must be a "
                     f"multiple of key heads ({k.shape[2]}).")
  s = k.shape[1]
  bias = _as_4d("bias", bias, b, n, t, s)
  if mask is not None:
    mask = _as_4d("mask", mask, b, n, t, s)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"dot_product_attention: mask must be boolean; got "
                       f"{mask.dtype}.")
  block_size = methods_base.integer("block_size", block_size,
                                    "dot_product_attention")
  if scale is None:
    scale = 1.0 / math.sqrt(h)
  scale = methods_base.concrete_number("scale", scale,
                                       "dot_product_attention")
  method = methods_base.resolve_stateless(method, "dot_product_attention")
  ops = tuple(Operand(tuple(a.shape), a.dtype,
                      lhs_manual=base.manual_axis_type(a)) for a in (q, k, v))
  if method is not None:
    for op in ops:
      method.check_op(op)
  spec = _Spec(scale, bool(is_causal), block_size, method, *ops,
               None if bias is None else tuple(bias.shape),
               None if bias is None else bias.dtype,
               None if mask is None else tuple(mask.shape))
  out, stats = _attention(spec, q, k, v, bias, mask)
  if method is not None:
    for st in stats:
      method.report(st)
  return out[0] if squeeze else out
