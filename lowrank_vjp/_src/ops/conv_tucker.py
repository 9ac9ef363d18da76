"""The convolution's weight gradient from a Tucker residual, in rank space.

With ``lhs ≈ core ×_a U_a`` (a :class:`TuckerResidual`), ``d rhs`` is
computed from the core and factors without rebuilding the input at full
size: either entirely by einsums in the Tucker rank space
(:func:`weight_grad_tucker`) or as a convolution over the batch and channel
rank spaces (:func:`weight_grad_conv`), whichever has the smaller largest
intermediate for the layer's static shapes (:func:`weight_grad`).

The reference is ``ConvSpec.weight_grad(res.reconstruct(), g)``; the tests
compare the fast paths against it.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_vjp._src import schedule
from lowrank_vjp._src import vma
from lowrank_vjp._src.tensor import tucker as tucker_lib

TuckerResidual = tucker_lib.TuckerResidual


def _batch_matrix(spec, g: jax.Array) -> jax.Array:
  """``g`` viewed as ``[N, Q]`` (batch axis first) or ``[P, N, Q]`` (no copy).

  One view for every reader of ``g``: XLA drops a leading axis of size 1
  from a contraction's operand but not from a loop's, and built ``g`` once
  per shape.
  """
  ob = spec.dimension_numbers.out_spec[0]
  p, q = math.prod(g.shape[:ob]), math.prod(g.shape[ob + 1:])
  return g.reshape((g.shape[ob], q) if p == 1 else (p, g.shape[ob], q))


def _contract_batch(spec, u, g_view: jax.Array, g_shape):
  """``g ×_batch uᵀ``: the output gradient in the batch rank space.

  Args:
    spec: The convolution.
    u: ``U_B`` (or a slab of its columns), ``[N, K]``.
    g_view: ``g`` as :func:`_batch_matrix` views it.
    g_shape: ``g``'s shape.

  Returns:
    ``g`` with its batch axis of size ``K``.
  """
  ob = spec.dimension_numbers.out_spec[0]
  batch = g_view.ndim - 2
  # U_B as the left operand: XLA then reads g in its own layout, where with g
  # on the left it made a transposed copy of the whole output gradient.
  t = jax.lax.dot_general(u, g_view.astype(u.dtype),
                          (((0,), (batch,)), ((), ())),
                          precision=spec.precision)  # [K, (P,) Q]
  return jnp.moveaxis(t, 0, batch).reshape(
      tuple(g_shape[:ob]) + (u.shape[1],) + tuple(g_shape[ob + 1:]))


def _rank_space_layout(spec, res: TuckerResidual):
  """Which factors :func:`weight_grad_conv` expands, and the shapes it uses.

  The batch factor is folded into ``g``; the channel factor stays in rank
  space (expanded on the small ``dW`` afterwards) unless the convolution is
  grouped, whose groups need the real channels; spatial factors are expanded.

  Returns:
    ``(expand, keep_channel_rank, lhs_shape)``: per-axis factors to expand,
    whether the channel axis stays in rank space, and the shape of the
    partially rebuilt input.
  """
  dn = spec.dimension_numbers
  batch, channel = dn.lhs_spec[0], dn.lhs_spec[1]
  keep_channel_rank = (res.factors[channel] is not None
                       and spec.feature_group_count == 1)
  expand = tuple(None if a == batch or (a == channel and keep_channel_rank)
                 else f for a, f in enumerate(res.factors))
  shape = tuple(c if f is None else f.shape[0]
                for c, f in zip(res.core.shape, expand))
  return expand, keep_channel_rank, shape


def weight_grad_conv(spec, res: TuckerResidual,
                     g: jax.Array) -> jax.Array:
  """``d rhs`` as a convolution over the batch and channel rank spaces.

  The spatial factors are expanded (an input of ``K_B × K_C × spatial``),
  the weight gradient of the convolution is taken against ``g ×_B U_Bᵀ`` with
  ``K_C`` input channels, and the channel factor expands that small gradient
  to ``C`` channels. Grouped convolutions expand the channels first. This is
  the batch-mode SVD's backward, and HOSVD's when it is smaller than
  :func:`weight_grad_tucker`'s (:func:`weight_grad` chooses).

  The weight gradient is a sum over the batch rank: when the partly rebuilt
  input would exceed an eighth of the output gradient, it is summed over
  slabs of ``K_B`` (:func:`batch_rank_slabs`), so that each slab's rebuilt
  input, its transposed copy and its slice of ``g`` stay small.

  The rebuild (and the loop's starting carry) is pinned to the backward pass
  after a batch contraction of ``g``, never after ``g`` itself, so that
  XLA builds ``g`` once, fused with its producers (tests in
  tests/ops/test_ops_conv_tucker_memory.py).
  """
  dn = spec.dimension_numbers
  expand, keep_channel_rank, shape = _rank_space_layout(spec, res)
  batch = dn.lhs_spec[0]
  u_b = res.factors[batch]
  ob = dn.out_spec[0]
  per_rank = max(math.prod(shape) // max(shape[batch], 1),
                 g.size // max(g.shape[ob], 1))
  slabs = 1 if u_b is None else batch_rank_slabs(
      u_b.shape[1], per_rank, g.size)
  if keep_channel_rank:
    u_c = res.factors[dn.lhs_spec[1]]
    in_axis = dn.rhs_spec[1]
    rhs_shape = list(spec.rhs_shape)
    rhs_shape[in_axis] = u_c.shape[1]
  else:
    rhs_shape = list(spec.rhs_shape)

  g_view = _batch_matrix(spec, g)  # what every contraction reads

  def contract(u_s):
    return g if u_s is None else _contract_batch(spec, u_s, g_view, g.shape)

  def slab_grad(core_s, g_s, in_loop=False):
    lhs = TuckerResidual(core_s, expand).reconstruct(dtype=spec.lhs_dtype)
    # Inside shard_map the rank-space gradient is per device (each device
    # has its own factors): transposed at the input's varying type, so that
    # it is not summed over devices before its own U_C expands it.
    reduced = dataclasses.replace(
        spec, lhs_shape=tuple(lhs.shape), rhs_shape=tuple(rhs_shape),
        rhs_manual=spec.lhs_manual if keep_channel_rank else spec.rhs_manual)
    if in_loop:
      return canonical_weight_grad(reduced, lhs, g_s)
    return reduced.weight_grad(lhs, g_s)

  # The core is rebuilt in the backward pass only, pinned after a
  # batch-contracted gradient (a contraction's output) rather than after g:
  # the one element of g that schedule.after reads fused a copy of g's
  # producers into a kernel of its own, and XLA could then fuse them into
  # g's real consumer no more. Behind ResNet's stem (max-pool backward,
  # BatchNorm) that kept the pool's phase stack, one more stem-sized buffer.
  if slabs == 1:
    g_b = contract(u_b)
    dw = slab_grad(schedule.after(res.core, g_b), g_b)
  else:
    k = u_b.shape[1] // slabs
    us = jnp.moveaxis(u_b.reshape(u_b.shape[0], slabs, k), 1, 0)
    acc = jnp.promote_types(spec.rhs_dtype, jnp.float32)
    # The first slab's contraction, for the pins only (the loop computes it
    # again, cheap next to the slab's weight gradient). Peeling the first
    # slab off the loop instead measured worse (ResNet18, batch 64: 167 MiB
    # more for HOSVD); XLA unrolls a loop left with one step and scheduled
    # its parts apart.
    pin = contract(us[0])
    core = schedule.after(res.core, pin)
    like = jax.eval_shape(  # the loop's gradient, its varying type included
        slab_grad, jax.lax.dynamic_slice_in_dim(core, 0, k, axis=batch), pin)
    zeros = vma.like(jnp.zeros(rhs_shape, acc), like)
    # Zeros built from nothing were placed at the start of the step and held
    # a weight-sized carry per layer through the whole forward pass. (Inside
    # shard_map a pin varying where the gradient does not would change the
    # carry's type: left unpinned there.)
    if vma.varying(pin) <= vma.varying(like):
      zeros = schedule.after(zeros, pin)

    def add_slab(dw, slab):
      i, u_s = slab
      # The slab's core is sliced where it is used: no transposed copy of
      # the whole core.
      core_s = jax.lax.dynamic_slice_in_dim(core, i * k, k, axis=batch)
      return dw + slab_grad(core_s, contract(u_s), in_loop=True).astype(
          acc), None

    dw, _ = jax.lax.scan(add_slab, zeros, (jnp.arange(slabs), us))
  if not keep_channel_rank:
    return dw.astype(spec.rhs_dtype)
  dw = jnp.tensordot(dw.astype(u_c.dtype), u_c, axes=([in_axis], [1]),
                     precision=spec.precision)
  return jnp.moveaxis(dw, -1, in_axis).astype(spec.rhs_dtype)


def canonical_layout(spec):
  """``spec`` in the N…C / …IO / N…C layout, and the permutations to it.

  Returns:
    ``(canonical spec, lhs permutation, out permutation, rhs permutation)``:
    ``jnp.transpose(lhs, lhs_perm)`` (and ``out_perm`` for the output, its
    gradient) is an operand of the canonical spec, whose weight gradient
    ``jnp.transpose``'d by ``argsort(rhs_perm)`` is ``spec``'s.
  """
  dn = spec.dimension_numbers
  n = len(spec.lhs_shape)
  lhs_perm = (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],)
  out_perm = (dn.out_spec[0],) + tuple(dn.out_spec[2:]) + (dn.out_spec[1],)
  rhs_perm = tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0])
  canonical = jax.lax.ConvDimensionNumbers(
      lhs_spec=(0, n - 1) + tuple(range(1, n - 1)),
      rhs_spec=(n - 1, n - 2) + tuple(range(n - 2)),
      out_spec=(0, n - 1) + tuple(range(1, n - 1)))
  spec_c = dataclasses.replace(
      spec, lhs_shape=tuple(spec.lhs_shape[a] for a in lhs_perm),
      rhs_shape=tuple(spec.rhs_shape[a] for a in rhs_perm),
      dimension_numbers=canonical)
  return spec_c, lhs_perm, out_perm, rhs_perm


def canonical_weight_grad(spec, lhs: jax.Array, g: jax.Array) -> jax.Array:
  """``spec.weight_grad(lhs, g)``, computed in :func:`canonical_layout`.

  For a loop body. XLA:CPU (jaxlib 0.10.2) miscomputes a convolution whose
  kernel has a single tap, which it rewrites into a matrix product, inside
  a loop or conditional body (not in the entry computation) when its input
  and output order their batch and spatial axes differently: the result
  comes back with those axes transposed. The weight gradient of a
  convolution with a one-pixel output is such a convolution (its "kernel"
  is ``g``); with ``("CWN", "WIO", "NCW")`` the slab loop of
  :func:`weight_grad_conv` returned a weight gradient with two entries
  swapped. In the N…C / …IO layout XLA computes it right (tests in
  tests/ops/test_ops_conv_tucker.py); for NHWC / HWIO the transposes are
  the identity. Grouped convolutions are computed tap by tap
  (:func:`_grouped_weight_grad_by_taps`), which in a loop is much faster.
  """
  spec_c, lhs_perm, out_perm, rhs_perm = canonical_layout(spec)
  if spec.feature_group_count > 1:
    dw = _grouped_weight_grad_by_taps(spec_c, jnp.transpose(lhs, lhs_perm),
                                      jnp.transpose(g, out_perm))
  elif spec_c.dimension_numbers == spec.dimension_numbers:
    return spec.weight_grad(lhs, g)
  else:
    dw = spec_c.weight_grad(jnp.transpose(lhs, lhs_perm),
                            jnp.transpose(g, out_perm))
  return jnp.transpose(dw, np.argsort(rhs_perm))


def _grouped_weight_grad_by_taps(spec_c, lhs: jax.Array,
                                 g: jax.Array) -> jax.Array:
  """A grouped convolution's ``d rhs`` in the canonical layout, tap by tap.

  JAX transposes a grouped convolution into one with ``batch_group_count``,
  which XLA:CPU computes as a dense masked convolution; inside a loop body
  it was 29× slower than outside (MobileNetV2's 3×3 depthwise convolution
  of 960 channels at 7×7, batch 64: the SVD backward 9.8 s against 0.34 s
  without the slab loop). Here each kernel tap is a strided slice of the
  padded input contracted with ``g`` over batch and space, batched over the
  groups: ``dW[k, i, G·O_g + j] = Σ x_pad[n, o·s + k·d, G·C_g + i]
  g[n, o, G·O_g + j]``.
  """
  nsp = spec_c.num_spatial
  groups = spec_c.feature_group_count
  out_dtype = (spec_c.preferred_element_type
               if spec_c.preferred_element_type is not None
               else jnp.result_type(lhs.dtype, spec_c.rhs_dtype))
  kernel = spec_c.rhs_shape[:nsp]
  cg, o = spec_c.rhs_shape[nsp], spec_c.rhs_shape[nsp + 1]
  out_sp = g.shape[1:1 + nsp]
  if g.size == 0 or lhs.size == 0:  # lax allows empty operands and outputs
    return jnp.zeros(tuple(kernel) + (cg, o), out_dtype)
  zero = jnp.zeros((), lhs.dtype)
  xp = jax.lax.pad(lhs, zero, [(0, 0, 0)] + [
      (lo, hi, dil - 1) for (lo, hi), dil in zip(
          spec_c.padding, spec_c.lhs_dilation, strict=True)] + [(0, 0, 0)])
  rows = g.shape[0] * math.prod(out_sp)
  g_view = g.reshape(rows, groups, o // groups)
  span = [(n - 1) * st + 1 for n, st in zip(out_sp, spec_c.window_strides,
                                             strict=True)]
  offsets = np.array([[t * d for t, d in zip(tap, spec_c.rhs_dilation,
                                               strict=True)]
                      for tap in np.ndindex(*kernel)], np.int32)

  # One tap per step of a loop: the taps' windows (each as large as the
  # slab's input) are then never alive together.
  def tap_grad(_, offset):
    first = jnp.zeros((), offset.dtype)  # one index type, x64 or not
    start = [first] + [offset[d] for d in range(nsp)] + [first]
    window = jax.lax.dynamic_slice(
        xp, start, [xp.shape[0]] + span + [xp.shape[-1]])
    window = jax.lax.slice(window, [0] * (nsp + 2), window.shape,
                           [1] + list(spec_c.window_strides) + [1])
    dw = jax.lax.dot_general(
        window.reshape(rows, groups, cg), g_view,
        (((0,), (0,)), ((1,), (1,))), precision=spec_c.precision,
        preferred_element_type=out_dtype)                  # [G, C_g, O_g]
    return None, jnp.swapaxes(dw, 0, 1).reshape(cg, o)

  _, taps = jax.lax.scan(tap_grad, None, offsets)
  return taps.reshape(tuple(kernel) + (cg, o)).astype(out_dtype)


_SLAB_FRACTION = 8
_MAX_SLABS = 16


def batch_rank_slabs(rank: int, per_rank: int, out_elements: int) -> int:
  """Slabs of the batch rank :func:`weight_grad_conv` sums over.

  The fewest (a divisor of ``rank``, at most 16) that bring one slab's
  rebuilt input (``per_rank`` elements per unit of rank) under an eighth of
  the output gradient's ``out_elements``; 1 when it already is.
  """
  target = max(out_elements // _SLAB_FRACTION, 1)
  best = 1
  for n in range(1, min(rank, _MAX_SLABS) + 1):
    if rank % n:
      continue
    best = n
    if rank // n * per_rank <= target:
      break
  return best


def spatial_tap_factor(u: jax.Array, size: int, out_size: int, kernel: int,
                       stride: int, pad_lo: int, lhs_dil: int,
                       rhs_dil: int) -> jax.Array:
  """Rows of a spatial factor seen by each (kernel tap, output position).

  Output position ``o`` reads, through tap ``k``, the (dilated, padded) input
  position ``o·stride + k·rhs_dil - pad_lo``; it is a real input row when it
  lands inside the dilated input on a multiple of ``lhs_dil``.

  Args:
    u: Factor ``[I, K]``.
    size: ``I``, the undilated input size along this axis.
    out_size: ``O``, the output size along this axis.
    kernel: Kernel size along this axis.
    stride, pad_lo, lhs_dil, rhs_dil: The convolution's settings.

  Returns:
    ``[kernel, O, K]``: ``u[row]`` where the tap reads a real input row, else 0.
  """
  pos = (np.arange(out_size)[None, :] * stride
         + np.arange(kernel)[:, None] * rhs_dil - pad_lo)
  valid = (pos >= 0) & (pos <= (size - 1) * lhs_dil) & (pos % lhs_dil == 0)
  rows = np.where(valid, pos // lhs_dil, 0)
  return jnp.where(valid[..., None], u[rows], 0.0)


def weight_grad_tucker(spec, res: TuckerResidual,
                       g: jax.Array) -> jax.Array:
  """``d rhs`` contracted entirely in the Tucker rank space.

  With ``x = S ×_B U_B ×_C U_C ×_s U_s`` (s over spatial axes),

  ``dW[k…, c, o] = Σ U_C[c, j] S[i, j, r…] Π_s P_s[k_s, o_s, r_s]
  (U_B[n, i] g[n, o, o_s…])``

  where ``P_s`` (:func:`spatial_tap_factor`) folds strides, padding and
  dilations into the spatial factor. No array of the input's size is formed:
  the largest intermediate is ``K_B · O · Π_s (kernel_s · K_s)``. Grouped
  convolutions use the rows of ``U_C`` belonging to each output group.
  """
  dn = spec.dimension_numbers
  nsp = spec.num_spatial
  lhs_sp, rhs_sp, out_sp = dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:]
  ct = jnp.promote_types(res.core.dtype, jnp.float32)
  factors = [f if f is None else f.astype(ct) for f in res.factors]
  channel_axis = dn.lhs_spec[1]
  if factors[channel_axis] is None:
    factors[channel_axis] = jnp.eye(spec.lhs_shape[channel_axis], dtype=ct)

  # g batch-contracted to K_B in its own layout (no transposed copy of the
  # full gradient; the einsums below name its axes wherever they are).
  g = g.astype(ct)
  if factors[spec.batch_axis] is not None:
    g = jnp.moveaxis(jnp.tensordot(
        factors[spec.batch_axis], g, axes=([0], [dn.out_spec[0]]),
        precision=spec.precision), 0, dn.out_spec[0])
  out_sizes = [g.shape[a] for a in out_sp]
  kernel = [spec.rhs_shape[a] for a in rhs_sp]

  letters = iter(string.ascii_lowercase)
  i, o, j = next(letters), next(letters), next(letters)
  k = [next(letters) for _ in range(nsp)]
  r = [next(letters) for _ in range(nsp)]
  osp = [next(letters) for _ in range(nsp)]
  t = g
  t_idx = [None] * g.ndim
  for a, letter in zip(dn.out_spec, [i, o] + osp):
    t_idx[a] = letter
  for d in range(nsp):
    p = spatial_tap_factor(factors[lhs_sp[d]], spec.lhs_shape[lhs_sp[d]],
                           out_sizes[d], kernel[d], spec.window_strides[d],
                           spec.padding[d][0], spec.lhs_dilation[d],
                           spec.rhs_dilation[d])
    new_idx = [x for x in t_idx if x != osp[d]] + [k[d], r[d]]
    t = jnp.einsum(f"{''.join(t_idx)},{k[d]}{osp[d]}{r[d]}->{''.join(new_idx)}",
                   t, p, precision=spec.precision)
    t_idx = new_idx
  core = jnp.transpose(res.core.astype(ct), dn.lhs_spec)  # [i, j, r...]
  h_idx = [j, o] + k
  h = jnp.einsum(f"{i}{j}{''.join(r)},{''.join(t_idx)}->{''.join(h_idx)}",
                 core, t, precision=spec.precision)
  groups = spec.feature_group_count
  u_c = factors[channel_axis]
  cg = u_c.shape[0] // groups
  u_c = u_c.reshape(groups, cg, u_c.shape[1])
  h = h.reshape((h.shape[0], groups, -1) + h.shape[2:])
  ks = "".join(k)
  # dW canonical [O, I, k...] with O = groups × O_g.
  dw = jnp.einsum(f"GCJ,JGO{ks}->GOC{ks}", u_c, h, precision=spec.precision)
  dw = dw.reshape((dw.shape[0] * dw.shape[1],) + dw.shape[2:])
  dw = jnp.transpose(dw, np.argsort(dn.rhs_spec))
  return dw.astype(spec.rhs_dtype)


def _tucker_path_elements(spec, res: TuckerResidual) -> int:
  """Largest intermediate of :func:`weight_grad_tucker`, in elements."""
  dn = spec.dimension_numbers
  k_b = res.core.shape[dn.lhs_spec[0]]
  out_ch = spec.rhs_shape[dn.rhs_spec[0]]
  out_shape = spec.out_shape()
  sizes = [k_b * out_ch * math.prod(out_shape[a] for a in dn.out_spec[2:])]
  current = sizes[0]
  for d in range(spec.num_spatial):
    out_d = out_shape[dn.out_spec[2 + d]]
    taps = spec.rhs_shape[dn.rhs_spec[2 + d]] * res.core.shape[
        dn.lhs_spec[2 + d]]
    current = current // max(out_d, 1) * taps  # lax allows empty outputs
    sizes.append(current)
  return max(sizes)


def _conv_path_elements(spec, res: TuckerResidual) -> int:
  """Largest intermediate of :func:`weight_grad_conv`, in elements."""
  return math.prod(_rank_space_layout(spec, res)[2])


def weight_grad(spec, res: TuckerResidual,
                g: jax.Array) -> jax.Array:
  """``d rhs`` by the path with the smaller intermediate (static choice)."""
  if spec.batch_group_count != 1:
    core = schedule.after(res.core, g)
    lhs = TuckerResidual(core, res.factors).reconstruct(dtype=spec.lhs_dtype)
    return spec.weight_grad(lhs, g)
  spatial = spec.dimension_numbers.lhs_spec[2:]
  if (all(res.factors[a] is not None for a in spatial)
      and _tucker_path_elements(spec, res) <= _conv_path_elements(spec, res)):
    return weight_grad_tucker(spec, res, g)
  return weight_grad_conv(spec, res, g)
