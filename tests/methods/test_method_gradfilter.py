"""Gradient filter (methods/gradfilter.py) against a NumPy transcription.

The reference below writes out, in NumPy and in the reference code's NCHW
layout, the formulas of ``Conv2dAvgOp`` (SLDGroup/GradientFilter-CVPR23,
``custom_op/conv_avg.py``): PyTorch's ``avg_pool2d`` with
``divisor_override=1`` (a sum) for the activation and with
``count_include_pad=False`` for the output gradient, the kernel summed over
its window, and the pooled input gradient spread over ``(r·s)²`` blocks and
cropped. It is an independent loop-based implementation; the library works
by reshapes in any layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowrank_vjp as lv
from lowrank_vjp._src.methods import gradfilter as gradient_filter
from lowrank_vjp._src.ops import conv as conv_spec

# ------------------------------------------------- NumPy transcription ---


def _avg_pool2d(x, k, s, pad, *, divisor_override=None,
                count_include_pad=True):
  """PyTorch ``avg_pool2d`` (floor mode) on ``[N, C, H, W]``."""
  n, c, h, w = x.shape
  (kh, kw), (sh, sw), (ph, pw) = k, s, pad
  xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), x.dtype)
  xp[:, :, ph:ph + h, pw:pw + w] = x
  oh = (h + 2 * ph - kh) // sh + 1
  ow = (w + 2 * pw - kw) // sw + 1
  out = np.zeros((n, c, oh, ow), x.dtype)
  for i in range(oh):
    for j in range(ow):
      r0, c0 = i * sh, j * sw
      win = xp[:, :, r0:r0 + kh, c0:c0 + kw]
      if divisor_override is not None:
        div = divisor_override
      elif count_include_pad:
        div = kh * kw
      else:
        rows = np.clip([r0 - ph, r0 - ph + kh], 0, h)
        cols = np.clip([c0 - pw, c0 - pw + kw], 0, w)
        div = (rows[1] - rows[0]) * (cols[1] - cols[0])
      out[:, :, i, j] = win.sum(axis=(2, 3)) / div
  return out


def reference_grads(x, weight, grad_y, stride, groups, order):
  """``(grad_x, grad_w)`` of ``Conv2dAvgOp`` (x NCHW, weight OIHW)."""
  x_h, x_w = x.shape[-2:]
  k_h, k_w = weight.shape[-2:]
  h, w = grad_y.shape[-2:]
  p_h, p_w = math.ceil(h / order), math.ceil(w / order)
  weight_sum = weight.sum(axis=(-1, -2))
  x_order_h, x_order_w = order * stride[0], order * stride[1]
  x_pad_h = math.ceil((p_h * x_order_h - x_h) / 2)
  x_pad_w = math.ceil((p_w * x_order_w - x_w) / 2)
  x_sum = _avg_pool2d(x, (x_order_h, x_order_w), (x_order_h, x_order_w),
                      (x_pad_h, x_pad_w), divisor_override=1)
  n, c_in = x_sum.shape[:2]
  c_out = grad_y.shape[1]
  gy_pad_h = math.ceil((p_h * order - h) / 2)
  gy_pad_w = math.ceil((p_w * order - w) / 2)
  grad_y_avg = _avg_pool2d(grad_y, (order, order), (order, order),
                           (gy_pad_h, gy_pad_w), count_include_pad=False)
  if groups != 1:  # the reference's grouped branch: depthwise, one per chan.
    grad_x_sum = grad_y_avg * weight_sum.reshape(1, c_out, 1, 1)
    grad_w_sum = (x_sum * grad_y_avg).sum(axis=(0, 2, 3))
    grad_w = np.broadcast_to(grad_w_sum.reshape(c_out, 1, 1, 1),
                             (c_out, 1, k_h, k_w)).copy()
  else:
    grad_x_sum = np.einsum("oi,nopq->nipq", weight_sum, grad_y_avg)
    gy = grad_y_avg.transpose(1, 0, 2, 3).reshape(c_out, -1)
    gx = x_sum.transpose(0, 2, 3, 1).reshape(-1, c_in)
    grad_w = np.broadcast_to((gy @ gx).reshape(c_out, c_in, 1, 1),
                             (c_out, c_in, k_h, k_w)).copy()
  grad_x = np.repeat(np.repeat(grad_x_sum, x_order_h, axis=2), x_order_w,
                     axis=3)
  grad_x = grad_x[..., x_pad_h:x_pad_h + x_h, x_pad_w:x_pad_w + x_w]
  return grad_x, grad_w


# ------------------------------------------------------------- tests ---


def _vjp(f, args, g=None, seed=1):
  """``(f(*args), vjp(g))`` in one jitted call (g random if None)."""
  y = jax.eval_shape(f, *args)
  if g is None:
    g = jax.random.normal(jax.random.PRNGKey(seed), y.shape, y.dtype)
  out = jax.jit(lambda a, g: (f(*a), jax.vjp(f, *a)[1](g)))(tuple(args), g)
  return out[0], out[1], g

# (N, C, H, W, O, kernel, stride, padding, groups, radius)
CASES = [
    (2, 3, 8, 8, 4, 3, 1, 1, 1, 2),
    (2, 3, 8, 8, 4, 3, 1, 1, 1, 4),
    (2, 3, 7, 9, 5, 3, 1, 1, 1, 2),       # odd sizes: padded patches
    (1, 4, 9, 8, 6, 3, 2, 1, 1, 2),       # stride 2
    (1, 4, 9, 8, 6, 3, 2, 1, 1, 4),
    (2, 4, 8, 8, 4, 3, 1, 1, 4, 2),       # depthwise
    (2, 4, 11, 10, 4, 3, 2, 1, 4, 4),     # strided depthwise
    (1, 2, 8, 8, 3, 1, 1, 0, 1, 2),       # 1x1
    (2, 3, 10, 10, 2, 5, 1, 2, 1, 4),     # 5x5
]


def _case_arrays(n, c, h, w, o, k, groups, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, c, h, w))
  weight = rng.standard_normal((o, c // groups, k, k))
  return x, weight


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_numpy_transcription_nchw(case, x64):
  n, c, h, w, o, k, s, p, groups, radius = case
  x, weight = _case_arrays(n, c, h, w, o, k, groups)
  conv = lv.compressed_conv(method="gradfilter", radius=radius)
  kw = dict(dimension_numbers=("NCHW", "OIHW", "NCHW"),
            feature_group_count=groups)
  f = lambda x, w: conv(x, w, (s, s), [(p, p), (p, p)], **kw)
  y, (dx, dw), gy = _vjp(f, (jnp.asarray(x), jnp.asarray(weight)))
  np.testing.assert_allclose(
      y, lax.conv_general_dilated(x, weight, (s, s), [(p, p), (p, p)], **kw),
      rtol=1e-12)
  ref_dx, ref_dw = reference_grads(x, weight, np.asarray(gy), (s, s), groups,
                                   radius)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_any_layout_same_as_nchw(stride):
  x, weight = (jnp.asarray(a, jnp.float32)
               for a in _case_arrays(2, 4, 9, 8, 6, 3, 1))
  conv = lv.compressed_conv(method="gradfilter", radius=2)
  f_nchw = lambda x, w: conv(x, w, (stride, stride), "SAME",
                             dimension_numbers=("NCHW", "OIHW", "NCHW"))
  f_nhwc = lambda x, w: conv(x, w, (stride, stride), "SAME",
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y, (dx, dw), gy = _vjp(f_nchw, (x, weight))
  y2, (dx2, dw2), _ = _vjp(f_nhwc, (x.transpose(0, 2, 3, 1),
                                    weight.transpose(2, 3, 1, 0)),
                           gy.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(y2, y.transpose(0, 2, 3, 1), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(dx2, dx.transpose(0, 2, 3, 1), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(dw2, dw.transpose(2, 3, 1, 0), rtol=1e-5,
                             atol=1e-4)


def test_grouped_conv_uses_each_groups_weights(x64):
  # Two groups of two channels: the reference has no such branch; the
  # library's rule is the per-group version of its formula.
  x, weight = _case_arrays(2, 4, 8, 8, 6, 3, 2)
  conv = lv.compressed_conv(method="gradfilter", radius=2)
  kw = dict(dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=2)
  _, (dx, dw), gy = _vjp(lambda x, w: conv(x, w, (1, 1), "SAME", **kw),
                         (jnp.asarray(x), jnp.asarray(weight)))
  gy = np.asarray(gy)
  for grp in range(2):
    ci, co = slice(2 * grp, 2 * grp + 2), slice(3 * grp, 3 * grp + 3)
    ref_dx, ref_dw = reference_grads(x[:, ci], weight[co], gy[:, co], (1, 1),
                                     1, 2)
    np.testing.assert_allclose(dx[:, ci], ref_dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw[co], ref_dw, rtol=1e-10, atol=1e-12)


def test_radius_one_stride_one_pointwise_is_exact(x64):
  # r = 1 on a 1x1 convolution: no pooling, one tap: the exact gradients.
  x, weight = _case_arrays(2, 3, 5, 5, 4, 1, 1)
  kw = dict(dimension_numbers=("NCHW", "OIHW", "NCHW"))
  conv = lv.compressed_conv(method="gradfilter", radius=1)
  f = lambda x, w: conv(x, w, (1, 1), "VALID", **kw)
  g = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID", **kw)
  _, ours, gy = _vjp(f, (x, weight))
  _, ref, _ = _vjp(g, (x, weight), gy)
  for a, b in zip(ours, ref, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_constant_output_gradient_gives_exact_weight_gradient_pointwise(x64):
  # The filter's premise: where g is constant over each r x r patch and the
  # kernel is 1x1 (stride 1), the pooled weight gradient is exact.
  x, weight = _case_arrays(2, 3, 8, 8, 4, 1, 1)
  kw = dict(dimension_numbers=("NCHW", "OIHW", "NCHW"))
  conv = lv.compressed_conv(method="gradfilter", radius=2)
  coarse = np.random.default_rng(3).standard_normal((2, 4, 4, 4))
  gy = jnp.asarray(np.repeat(np.repeat(coarse, 2, axis=2), 2, axis=3))
  _, (dx, dw), _ = _vjp(lambda x, w: conv(x, w, (1, 1), "VALID", **kw),
                        (x, weight), gy)
  _, (rdx, rdw), _ = _vjp(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "VALID", **kw), (x, weight), gy)
  np.testing.assert_allclose(dw, rdw, rtol=1e-10)
  np.testing.assert_allclose(dx, rdx, rtol=1e-10)


def test_input_gradient_is_not_exact_in_general():
  # Unlike the Tucker methods, the input gradient is approximate too.
  x, weight = _case_arrays(2, 3, 8, 8, 4, 3, 1)
  kw = dict(dimension_numbers=("NCHW", "OIHW", "NCHW"))
  conv = lv.compressed_conv(method="gradfilter", radius=2)
  x, weight = jnp.asarray(x, jnp.float32), jnp.asarray(weight, jnp.float32)
  _, (dx, _), gy = _vjp(lambda x, w: conv(x, w, (1, 1), "SAME", **kw),
                        (x, weight))
  _, (rdx, _), _ = _vjp(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "SAME", **kw), (x, weight), gy)
  assert float(jnp.max(jnp.abs(dx - rdx))) > 1e-2


@pytest.mark.parametrize("radius,shape,stride", [
    (2, (2, 8, 8, 3), 1), (4, (2, 8, 8, 3), 1), (2, (1, 9, 7, 5), 2),
    (4, (1, 10, 10, 2), 2)])
def test_saved_bytes_match_formula(radius, shape, stride):
  x = jnp.ones(shape)
  w = jnp.ones((3, 3, shape[-1], 4))
  conv = lv.compressed_conv(method="gradfilter", radius=radius)
  dn = ("NHWC", "HWIO", "NHWC")
  f = lambda x, w: conv(x, w, (stride, stride), "SAME", dimension_numbers=dn)
  _, stats = conv.with_stats(x, w, (stride, stride), "SAME",
                             dimension_numbers=dn)
  out_h = -(-shape[1] // stride)
  out_w = -(-shape[2] // stride)
  expect = (shape[0] * shape[3] * -(-out_h // radius) * -(-out_w // radius)
            * 4)
  assert stats.residual_nbytes == expect
  assert stats.method == "gradfilter" and stats.capacity == (None,) * 4
  # jaxpr level: the VJP keeps x_sum and the kernel, nothing else.
  w_bytes = 4 * math.prod(w.shape)
  assert lv.measure.vjp_residual_bytes(f, x, w) == expect + w_bytes


def test_unsupported_settings_raise():
  x, w = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 2))
  dn = ("NHWC", "HWIO", "NHWC")
  conv = lv.compressed_conv(method="gradfilter", radius=2)
  with pytest.raises(ValueError, match="lhs_dilation"):
    conv(x, w, (1, 1), [(1, 1), (1, 1)], lhs_dilation=(2, 2),
         dimension_numbers=dn)
  with pytest.raises(ValueError, match="rhs_dilation"):
    conv(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn)
  with pytest.raises(ValueError, match="gradfilter"):
    lv.compressed_dense(method="gradfilter")(
        jnp.ones((2, 3)), jnp.ones((3, 4)), (((1,), (0,)), ((), ())))

  @lv.compressed_conv(method="gradfilter")
  def not_a_single_conv(x, w):
    return 2.0 * lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                          dimension_numbers=dn)
  with pytest.raises(ValueError, match="gradfilter"):
    not_a_single_conv(x, w)
  for radius in (0, True, 2.5, "2"):
    with pytest.raises(ValueError, match="radius"):
      lv.compressed_conv(method="gradfilter", radius=radius)


def test_single_conv_decorator_and_jit():
  dn = ("NHWC", "HWIO", "NHWC")

  @lv.compressed_conv(method="gradfilter", radius=2)
  def my_conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                    dimension_numbers=dn)
  drop_in = lv.compressed_conv(method="gradfilter", radius=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))
  a = jax.jit(jax.grad(lambda w: jnp.sum(my_conv(x, w) ** 2)))(w)
  b = jax.jit(jax.grad(lambda w: jnp.sum(drop_in(
      x, w, (1, 1), "SAME", dimension_numbers=dn) ** 2)))(w)
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_grid_formula():
  s = conv_spec.conv_spec(jnp.ones((1, 7, 9, 2)), jnp.ones((3, 3, 2, 2)),
                          (2, 2), "SAME",
                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  grid = gradient_filter.filter_grid(s, 2)
  assert grid.out_sizes == (4, 5)
  assert grid.patches == (2, 3)
  assert grid.in_pads == (1, 2)          # ceil((8 - 7) / 2), ceil((12-9)/2)
  assert grid.out_pads == (0, 1)


def test_bfloat16_input():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 4)) * 0.3
  conv = lv.compressed_conv(method="gradfilter", radius=2)
  f = lambda x, w: jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=(
      "NHWC", "HWIO", "NHWC")).astype(jnp.float32) ** 2)
  step = jax.jit(jax.grad(f, (0, 1)))
  low = step(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  for a, b in zip(low, step(x, w), strict=True):
    assert a.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))
                 / jnp.max(jnp.abs(b))) < 0.02


@pytest.mark.parametrize("radius,stride", [(2, 1), (4, 2)])
def test_method_apply_and_helpers_agree_with_the_drop_in(radius, stride, x64):
  """``GradFilter.apply`` is the old ``gradient_filter.conv(spec, r, x, w)``;
  its backward is the module's helpers."""
  x, weight = (jnp.asarray(a) for a in _case_arrays(2, 3, 9, 8, 4, 3, 1))
  kw = dict(dimension_numbers=("NCHW", "OIHW", "NCHW"))
  spec = conv_spec.conv_spec(x, weight, (stride, stride), "SAME", **kw)
  method = lv.methods.GradFilter(radius=radius)
  method.check_op(spec)
  y, (dx, dw), gy = _vjp(lambda x, w: method.apply(spec, x, w)[0],
                         (x, weight))
  _, (ddx, ddw), _ = _vjp(lambda x, w: lv.compressed_conv(method=method)(
      x, w, (stride, stride), "SAME", **kw), (x, weight), gy)
  np.testing.assert_array_equal(y, spec.apply(x, weight))
  np.testing.assert_allclose(dx, ddx, rtol=1e-12)
  np.testing.assert_allclose(dw, ddw, rtol=1e-12)
  grid = gradient_filter.filter_grid(spec, radius)
  x_sum = gradient_filter.pool_input(x, spec, grid)
  g_avg = gradient_filter.pool_output_grad(gy, spec, grid)
  assert x_sum.shape == (2, 3) + grid.patches
  assert g_avg.shape == (2, 4) + grid.patches
  np.testing.assert_allclose(
      gradient_filter.weight_grad(spec, x_sum, g_avg), dw, rtol=1e-12)
  np.testing.assert_allclose(
      gradient_filter.input_grad(spec, weight, g_avg, grid), dx, rtol=1e-12)
  ref_dx, ref_dw = reference_grads(np.asarray(x), np.asarray(weight),
                                   np.asarray(gy), (stride, stride), 1,
                                   radius)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-10, atol=1e-12)
  _, stats, _ = method.apply(spec, x, weight)
  assert stats.residual_nbytes == gradient_filter.residual_nbytes(
      spec, radius) == x_sum.size * 8


def test_check_supported_names_the_setting():
  x, w = jnp.ones((4, 8, 8, 2)), jnp.ones((3, 3, 2, 2))
  dn = ("NHWC", "HWIO", "NHWC")
  spec = conv_spec.conv_spec(x, w, (1, 1), "SAME", dimension_numbers=dn,
                             batch_group_count=2)
  with pytest.raises(ValueError, match="batch_group_count"):
    gradient_filter.check_supported(spec, 2)
  spec = conv_spec.conv_spec(x, w, (1, 1), "SAME", dimension_numbers=dn,
                             rhs_dilation=(2, 1))
  gradient_filter.check_supported(spec, 4)   # dilation below the radius
  with pytest.raises(ValueError, match="rhs_dilation"):
    gradient_filter.check_supported(spec, 2)
