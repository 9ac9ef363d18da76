"""Custom VJP for ``lax.conv_general_dilated`` with a compressed residual.

The forward pass is ``lax.conv_general_dilated`` itself. What is saved for the
backward pass is the weight ``rhs`` and a :class:`TuckerResidual` of the input
``lhs``; the full input is not saved. The backward pass returns

* ``d lhs``: the exact transpose of the convolution applied to ``g`` (it needs
  only ``rhs``);
* ``d rhs``: the weight gradient of the convolution evaluated at the
  compressed input, computed from the core and factors without rebuilding the
  input at full size: either entirely by einsums in the Tucker rank space
  (:func:`weight_grad_tucker`) or as a convolution over the batch and channel
  rank spaces (:func:`weight_grad_conv`), whichever has the smaller largest
  intermediate for the layer's static shapes.

:func:`weight_grad_reference` rebuilds the input and calls JAX's own VJP; the
tests compare the fast paths against it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank_vjp._src.ops import conv as conv_spec_lib
from lowrank_vjp._src.tensor import tucker as residuals

ConvSpec = conv_spec_lib.ConvSpec
TuckerResidual = residuals.TuckerResidual


def input_grad(spec: ConvSpec, rhs: jax.Array, g: jax.Array) -> jax.Array:
  """Exact ``d lhs``: the transpose of the convolution in ``lhs``."""
  lhs_aval = spec.lhs_aval()
  rhs = residuals.after(rhs, g)  # flip the kernel in the backward pass
  g = g.astype(_out_dtype(spec))
  return conv_spec_lib.transpose(lambda l: spec.apply(l, rhs), lhs_aval, g)


def _out_dtype(spec: ConvSpec):
  if spec.preferred_element_type is not None:
    return spec.preferred_element_type
  return jnp.result_type(spec.lhs_dtype, spec.rhs_dtype)


def _conv_weight_transpose(spec: ConvSpec, lhs: jax.Array,
                           g: jax.Array) -> jax.Array:
  """``d rhs`` of the convolution at input ``lhs`` (any batch size)."""
  rhs_aval = spec.rhs_aval()
  out_dtype = (spec.preferred_element_type
               if spec.preferred_element_type is not None
               else jnp.result_type(lhs.dtype, spec.rhs_dtype))
  return conv_spec_lib.transpose(
      lambda r: spec.apply(lhs, r, preferred_element_type=out_dtype,
                           out_sharding=None),
      rhs_aval, g.astype(out_dtype))


def weight_grad_reference(spec: ConvSpec, res: TuckerResidual,
                          g: jax.Array) -> jax.Array:
  """``d rhs`` from the activation rebuilt at full size (reference path)."""
  res = TuckerResidual(residuals.after(res.core, g), res.factors)
  lhs = res.reconstruct(dtype=spec.lhs_dtype)
  return _conv_weight_transpose(spec, lhs, g)


def _contract_batch(spec: ConvSpec, res: TuckerResidual, g: jax.Array):
  """``g ×_batch U_Bᵀ``: the output gradient in the batch rank space."""
  u = res.factors[spec.batch_axis]
  ob = spec.dimension_numbers.out_spec[0]
  if u is None:
    return g
  g = jnp.tensordot(g.astype(u.dtype), u, axes=([ob], [0]),
                    precision=spec.precision)
  return jnp.moveaxis(g, -1, ob)


def _rank_space_layout(spec: ConvSpec, res: TuckerResidual):
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


def weight_grad_conv(spec: ConvSpec, res: TuckerResidual,
                     g: jax.Array) -> jax.Array:
  """``d rhs`` as a convolution over the batch and channel rank spaces.

  The spatial factors are expanded (an input of ``K_B × K_C × spatial``),
  the weight gradient of the convolution is taken against ``g ×_B U_Bᵀ`` with
  ``K_C`` input channels, and the channel factor expands that small gradient
  to ``C`` channels. Grouped convolutions expand the channels first. This is
  the batch-mode SVD's backward, and HOSVD's when it is smaller than
  :func:`weight_grad_tucker`'s (:func:`weight_grad` chooses).
  """
  dn = spec.dimension_numbers
  expand, keep_channel_rank, _ = _rank_space_layout(spec, res)
  core = residuals.after(res.core, g)  # rebuild in the backward pass only
  lhs = TuckerResidual(core, expand).reconstruct(dtype=spec.lhs_dtype)
  g = _contract_batch(spec, res, g)
  if not keep_channel_rank:
    return _conv_weight_transpose(spec, lhs, g)
  u_c = res.factors[dn.lhs_spec[1]]
  in_axis = dn.rhs_spec[1]
  rhs_shape = list(spec.rhs_shape)
  rhs_shape[in_axis] = u_c.shape[1]
  reduced = dataclasses.replace(spec, lhs_shape=tuple(lhs.shape),
                                rhs_shape=tuple(rhs_shape))
  dw = _conv_weight_transpose(reduced, lhs, g)
  dw = jnp.tensordot(dw.astype(u_c.dtype), u_c, axes=([in_axis], [1]),
                     precision=spec.precision)
  return jnp.moveaxis(dw, -1, in_axis).astype(spec.rhs_dtype)


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


def weight_grad_tucker(spec: ConvSpec, res: TuckerResidual,
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

  # g in canonical order [N, O, o_1..o_d], then batch-contracted to [i, O, ...]
  g = jnp.transpose(g.astype(ct), dn.out_spec)
  if factors[spec.batch_axis] is not None:
    g = jnp.tensordot(factors[spec.batch_axis], g, axes=([0], [0]),
                      precision=spec.precision)
  out_sizes = g.shape[2:]
  kernel = [spec.rhs_shape[a] for a in rhs_sp]

  letters = iter(string.ascii_lowercase)
  i, o, j = next(letters), next(letters), next(letters)
  k = [next(letters) for _ in range(nsp)]
  r = [next(letters) for _ in range(nsp)]
  osp = [next(letters) for _ in range(nsp)]
  t = g
  t_idx = [i, o] + osp
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


def _tucker_path_elements(spec: ConvSpec, res: TuckerResidual) -> int:
  """Largest intermediate of :func:`weight_grad_tucker`, in elements."""
  dn = spec.dimension_numbers
  k_b = res.core.shape[dn.lhs_spec[0]]
  out_ch = spec.rhs_shape[dn.rhs_spec[0]]
  out_shape = jax.eval_shape(
      lambda l, r: spec.apply(l, r, out_sharding=None),
      jax.ShapeDtypeStruct(spec.lhs_shape, spec.lhs_dtype),
      jax.ShapeDtypeStruct(spec.rhs_shape, spec.rhs_dtype)).shape
  sizes = [k_b * out_ch * math.prod(out_shape[a] for a in dn.out_spec[2:])]
  current = sizes[0]
  for d in range(spec.num_spatial):
    out_d = out_shape[dn.out_spec[2 + d]]
    taps = spec.rhs_shape[dn.rhs_spec[2 + d]] * res.core.shape[
        dn.lhs_spec[2 + d]]
    current = current // max(out_d, 1) * taps  # lax allows empty outputs
    sizes.append(current)
  return max(sizes)


def _conv_path_elements(spec: ConvSpec, res: TuckerResidual) -> int:
  """Largest intermediate of :func:`weight_grad_conv`, in elements."""
  return math.prod(_rank_space_layout(spec, res)[2])


def weight_grad(spec: ConvSpec, res: TuckerResidual,
                g: jax.Array) -> jax.Array:
  """``d rhs`` by the path with the smaller intermediate (static choice)."""
  if spec.batch_group_count != 1:
    return weight_grad_reference(spec, res, g)
  spatial = spec.dimension_numbers.lhs_spec[2:]
  if (all(res.factors[a] is not None for a in spatial)
      and _tucker_path_elements(spec, res) <= _conv_path_elements(spec, res)):
    return weight_grad_tucker(spec, res, g)
  return weight_grad_conv(spec, res, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def conv(spec: ConvSpec, lhs: jax.Array, rhs: jax.Array,
         res: TuckerResidual) -> jax.Array:
  """``lax.conv_general_dilated(lhs, rhs, **spec)`` saving ``res``, not ``lhs``.

  Args:
    spec: The convolution.
    lhs: Input, shape ``spec.lhs_shape``.
    rhs: Kernel, shape ``spec.rhs_shape``.
    res: Compressed ``lhs`` (no gradient flows into it).

  Returns:
    The convolution's output.
  """
  del res
  return spec.apply(lhs, rhs)


def _conv_fwd(spec, lhs, rhs, res):
  y = residuals.tie(spec.apply(lhs, rhs), res)
  return y, (res, rhs)


def _conv_bwd(spec, saved, g):
  res, rhs = saved
  return (input_grad(spec, rhs, g), weight_grad(spec, res, g),
          jax.tree_util.tree_map(jnp.zeros_like, res))


conv.defvjp(_conv_fwd, _conv_bwd)
