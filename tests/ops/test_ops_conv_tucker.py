"""Tests for lowrank_vjp._src.ops.conv_tucker: the conv's rank-space dW.

For ε < 1 the fast weight gradients (:func:`conv_tucker.weight_grad_tucker`,
:func:`conv_tucker.weight_grad_conv`, the static choice
:func:`conv_tucker.weight_grad`, and through them ``ConvSpec``'s
``tucker_weight_grad`` and the Tucker methods' ``weight_grad``) must equal
the reference ``spec.weight_grad(res.reconstruct(), g)`` built from the same
residual.
"""

from __future__ import annotations

import math

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from conv_cases import (
  BATCH_GROUP,
  GRID_BY_NAME,
  METHODS,
  ONE_PIXEL_CASES,
  TOL,
  Case,
  cotangent,
  forward_and_vjp,
  rel_err,
)
from hypothesis import given, settings
from jax import lax
from test_ops_conv import conv_cases

import lowrank_vjp as lv
from lowrank_vjp._src.ops import conv as conv_lib
from lowrank_vjp._src.ops import conv_tucker
from lowrank_vjp._src.tensor import hosvd

EPS_LT1_NAMES = (
    "stride2_valid", "asym_pad_stride2", "negative_pad",
    "rhs_dil21_valid_stride2", "lhs_and_rhs_dil", "depthwise_mult2_stride2",
    "grouped2", "kernel1x1_stride2", "kernel5x5_same", "batch1",
    "nchw_lhs_dil", "nchw_depthwise_stride2", "mixed_layout",
    "conv1d_grouped", "conv3d_grouped_stride_dil")
EPS_LT1_F64_NAMES = ("asym_pad_stride2", "nchw_lhs_dil", "conv1d_grouped",
                     "conv3d_grouped_stride_dil")
EPS_LT1_PARAMS = (
    [pytest.param(n, "float32", id=n) for n in EPS_LT1_NAMES]
    + [pytest.param(n, "float64", id=n + "-f64") for n in EPS_LT1_F64_NAMES])


def _spec_and_cotangent(case, x, w, seed=7):
  spec = conv_lib.conv_spec(x, w, **case.lax_kwargs)
  out = jax.eval_shape(spec.apply, x, w)
  return spec, cotangent(out.shape, out.dtype, seed)


def _weight_grads_from_residual(spec, x, g, method):
  """Every weight-gradient path for the residual ``method`` makes of ``x``."""
  capacity = method.capacity(x.shape, spec.batch_axis)

  @jax.jit
  def run(x, g):
    res, stats = hosvd.tucker_compress(x, capacity, method.eps, method.label)
    grads = {
        "dispatch": conv_tucker.weight_grad(spec, res, g),
        "reference": spec.weight_grad(res.reconstruct(dtype=spec.lhs_dtype),
                                      g),
        "spec": spec.tucker_weight_grad(res, g),
        "method": method.weight_grad(spec, res, g),
    }
    if spec.batch_group_count > 1:  # only the reference path handles it
      return grads, stats, res.reconstruct(dtype=x.dtype), capacity
    grads["conv"] = conv_tucker.weight_grad_conv(spec, res, g)
    spatial = spec.dimension_numbers.lhs_spec[2:]
    if all(res.factors[a] is not None for a in spatial):
      grads["tucker"] = conv_tucker.weight_grad_tucker(spec, res, g)
    return grads, stats, res.reconstruct(dtype=x.dtype), capacity

  return run(x, g)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,dtype", EPS_LT1_PARAMS)
def test_fast_weight_grad_matches_reference(name, dtype, method):
  case = GRID_BY_NAME[name]
  # The largest of N batch components holds >= 1/N of the energy, so
  # ε = 0.3 truncates the batch mode for N <= 3.
  eps = 0.6 if method == "hosvd" else 0.3
  with jax.enable_x64(dtype == "float64"):
    x, w = case.operands(dtype, seed=11)
    spec, g = _spec_and_cotangent(case, x, w)
    m = lv.methods.resolve(method, eps=eps, rank_fraction=1.0)
    grads, stats, rebuilt, _ = _weight_grads_from_residual(spec, x, g, m)
  # The residual really is truncated, and within capacity.
  assert not bool(stats.overflow)
  if case.n > 1 or method == "hosvd":
    assert rel_err(rebuilt, x) > 1e-2
    assert np.any(np.asarray(stats.kept_ranks) < np.asarray(x.shape))
  ref = grads["reference"]
  assert ref.shape == w.shape and ref.dtype == w.dtype
  if method == "hosvd":
    assert "tucker" in grads  # all spatial modes compressed: the Tucker path
  for path, dw in grads.items():
    assert dw.shape == w.shape and dw.dtype == w.dtype, path
    assert rel_err(dw, ref) <= TOL[dtype], (path, rel_err(dw, ref))


@pytest.mark.parametrize("name", ["base_3x3_same", "nchw_stride2_asym",
                                  "conv1d_grouped", "lhs_dil21_stride2"])
def test_partially_compressed_hosvd_uses_conv_path(name):
  """HOSVD with an uncompressed spatial axis: weight_grad_conv, still exact."""
  case = GRID_BY_NAME[name]
  x, w = case.operands("float32", seed=13)
  spec, g = _spec_and_cotangent(case, x, w)
  ranks = list(x.shape)
  ranks[spec.dimension_numbers.lhs_spec[-1]] = None  # last spatial axis
  m = lv.methods.Hosvd(eps=0.6, ranks=tuple(ranks))
  grads, _, rebuilt, capacity = _weight_grads_from_residual(spec, x, g, m)
  assert capacity.count(None) == 1
  assert "tucker" not in grads
  assert rel_err(rebuilt, x) > 1e-2
  for path in ("dispatch", "conv", "spec", "method"):
    assert rel_err(grads[path], grads["reference"]) <= 1e-4, path


@pytest.mark.parametrize("case", BATCH_GROUP, ids=str)
def test_batch_group_count_eps_below_one(case):
  x, w = case.operands("float32", seed=2)
  spec, g = _spec_and_cotangent(case, x, w)
  m = lv.methods.Hosvd(eps=0.6, rank_fraction=1.0)
  grads, _, rebuilt, _ = _weight_grads_from_residual(spec, x, g, m)
  assert rel_err(rebuilt, x) > 1e-2
  assert rel_err(grads["dispatch"], grads["reference"]) <= 1e-6
  for path in ("spec", "method"):
    assert rel_err(grads[path], grads["reference"]) <= 1e-6, path
  conv = lv.compressed_conv(eps=0.6, on_overflow="ignore")
  got = forward_and_vjp(conv, x, w, case.lax_kwargs)
  want = forward_and_vjp(lax.conv_general_dilated, x, w, case.lax_kwargs)
  assert rel_err(got[0], want[0]) <= 1e-6
  assert rel_err(got[1], want[1]) <= 1e-6


# ------------------------------------------- helpers of the fast paths ---


@pytest.mark.parametrize("size,out_size,kernel,stride,pad_lo,lhs_dil,rhs_dil",
                         [(7, 7, 3, 1, 1, 1, 1), (9, 4, 3, 2, 0, 1, 1),
                          (5, 10, 3, 1, 1, 2, 1), (8, 4, 3, 1, -1, 1, 2),
                          (6, 3, 5, 2, 2, 1, 1)])
def test_spatial_tap_factor_rows(size, out_size, kernel, stride, pad_lo,
                                 lhs_dil, rhs_dil):
  """Row ``o·s + k·d - pad`` of ``u`` where it is a real (undilated) row."""
  u = np.random.default_rng(0).standard_normal((size, 2)).astype(np.float32)
  p = np.asarray(conv_tucker.spatial_tap_factor(
      u, size, out_size, kernel, stride, pad_lo, lhs_dil, rhs_dil))
  assert p.shape == (kernel, out_size, 2)
  for k in range(kernel):
    for o in range(out_size):
      pos = o * stride + k * rhs_dil - pad_lo
      real = 0 <= pos <= (size - 1) * lhs_dil and pos % lhs_dil == 0
      want = u[pos // lhs_dil] if real else np.zeros(2)
      np.testing.assert_array_equal(p[k, o], want)


@pytest.mark.parametrize("name", ["kernel1x1", "kernel5x5_same", "batch1",
                                  "conv3d_same"])
def test_dispatch_picks_the_smaller_intermediate(name):
  """``weight_grad`` follows the path-size estimates (static choice)."""
  case = GRID_BY_NAME[name]
  x, w = case.operands("float32", seed=31)
  spec, g = _spec_and_cotangent(case, x, w)
  m = lv.methods.Hosvd(eps=0.6, rank_fraction=0.5)
  res, _ = hosvd.tucker_compress(x, m.capacity(x.shape, spec.batch_axis),
                                 m.eps, "hosvd")
  tucker = conv_tucker._tucker_path_elements(spec, res)  # pylint: disable=protected-access
  conv = conv_tucker._conv_path_elements(spec, res)  # pylint: disable=protected-access
  assert tucker > 0 and conv > 0
  want = (conv_tucker.weight_grad_tucker if tucker <= conv
          else conv_tucker.weight_grad_conv)(spec, res, g)
  np.testing.assert_array_equal(conv_tucker.weight_grad(spec, res, g), want)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["asym_pad_stride2", "nchw_depthwise_stride2",
                                  "conv1d_grouped"])
def test_method_apply_backward_is_the_reference_at_its_residual(name, method):
  """``Hosvd/Svd(...).apply(spec, x, w)`` (the old ``conv_rule.conv``): exact
  dx, and dW equal to the reference at the residual the method saves."""
  case = GRID_BY_NAME[name]
  x, w = case.operands("float32", seed=37)
  spec, g = _spec_and_cotangent(case, x, w)
  m = lv.methods.resolve(method, eps=0.6 if method == "hosvd" else 0.3,
                         rank_fraction=1.0, on_overflow="error")

  @jax.jit
  def run(x, w, g):
    y, vjp = jax.vjp(lambda a, b: m.apply(spec, a, b)[0], x, w)
    dx, dw = vjp(g)
    res, _, _ = m.compress_for(spec, x, None)
    ref = spec.weight_grad(res.reconstruct(dtype=spec.lhs_dtype), g)
    return y, dx, dw, ref, spec.input_grad(w, g), res.reconstruct()

  y, dx, dw, ref_dw, ref_dx, rebuilt = run(x, w, g)
  np.testing.assert_array_equal(y, spec.apply(x, w))
  assert rel_err(rebuilt, x) > 1e-2 or case.n == 1  # ε < 1 truncated
  assert rel_err(dx, ref_dx) <= 1e-6
  assert rel_err(dw, ref_dw) <= TOL["float32"], rel_err(dw, ref_dw)


def _nhwc_spec_and_residual(n=32, size=24, channels=16):
  x = jax.ShapeDtypeStruct((n, size, size, channels), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, channels, channels), jnp.float32)
  spec = conv_lib.conv_spec(x, w, window_strides=(1, 1), padding="SAME",
                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
  method = lv.methods.resolve("hosvd", eps=0.9)
  return spec, x, method.capacity(x.shape, spec.batch_axis)


@pytest.mark.parametrize("path,limit", [("weight_grad_conv", 2.5),
                                        ("weight_grad_tucker", 3.0)])
def test_weight_grad_makes_no_transposed_copy_of_g(path, limit):
  """Both paths read g in its own layout (and the conv path by slabs).

  Before: g transposed to put its batch axis last or first, and the partly
  rebuilt input whole; 4.0 x g's bytes of temp on both paths here.
  """
  spec, x, capacity = _nhwc_spec_and_residual()
  fn = getattr(conv_tucker, path)

  def run(x, g):
    res, _ = hosvd.tucker_compress(x, capacity, 0.9, "hosvd")
    return fn(spec, res, g)

  temp = lv.measure.xla_memory(run, x, x).temp_bytes
  assert temp < limit * math.prod(x.shape) * 4, temp / (math.prod(x.shape) * 4)


def test_batch_rank_slabs_sum_to_the_whole(monkeypatch):
  case = GRID_BY_NAME["stride2_valid"]
  x, w = case.operands("float32", seed=3)
  spec, g = _spec_and_cotangent(case, x, w)
  m = lv.methods.resolve("hosvd", eps=1.0, rank_fraction=1.0)
  res, _ = hosvd.tucker_compress(x, m.capacity(x.shape, spec.batch_axis),
                                 1.0, "hosvd")
  monkeypatch.setattr(conv_tucker, "_SLAB_FRACTION", 1 << 30)  # many slabs
  rank = res.core.shape[spec.batch_axis]
  assert conv_tucker.batch_rank_slabs(rank, 1, 1) > 1
  sliced = conv_tucker.weight_grad_conv(spec, res, g)
  monkeypatch.setattr(conv_tucker, "_SLAB_FRACTION", 1)        # one slab
  whole = conv_tucker.weight_grad_conv(spec, res, g)
  ref = spec.weight_grad(x, g)
  assert rel_err(sliced, whole) <= 1e-5
  assert rel_err(sliced, ref) <= TOL["float32"]


@pytest.mark.parametrize("rank,per_rank,out,want", [
    (32, 100, 32 * 100 * 8, 1), (32, 100, 32 * 100, 8), (32, 100, 3200 * 4, 2),
    (7, 100, 10, 7), (64, 100, 10, 16)])
def test_batch_rank_slab_count(rank, per_rank, out, want):
  assert conv_tucker.batch_rank_slabs(rank, per_rank, out) == want


@pytest.mark.parametrize("case", ONE_PIXEL_CASES, ids=str)
@pytest.mark.parametrize("method", ["svd", "hosvd"])
def test_slab_loop_weight_grad_of_one_pixel_outputs(case, method, monkeypatch):
  x, w = case.operands("float32", seed=3)
  spec, g = _spec_and_cotangent(case, x, w)
  assert all(spec.out_shape()[a] == 1
             for a in spec.dimension_numbers.out_spec[2:])
  m = lv.methods.resolve(method, eps=1.0)
  res, _ = hosvd.tucker_compress(x, m.capacity(x.shape, spec.batch_axis),
                                 1.0, method)
  monkeypatch.setattr(conv_tucker, "_SLAB_FRACTION", 1 << 30)  # many slabs
  assert conv_tucker.batch_rank_slabs(
      res.core.shape[spec.batch_axis], 1, 1) > 1
  got = jax.jit(lambda r, g: conv_tucker.weight_grad_conv(spec, r, g))(res, g)
  assert rel_err(got, spec.weight_grad(x, g)) <= TOL["float32"]


@pytest.mark.parametrize("case", ONE_PIXEL_CASES, ids=str)
def test_canonical_weight_grad_matches_the_spec_in_a_loop(case):
  """In a loop body, the canonical layout's gradient is the entry's one."""
  x, w = case.operands("float32", seed=3)
  spec, g = _spec_and_cotangent(case, x, w)
  want = spec.weight_grad(x, g)
  spec_c, *_ = conv_tucker.canonical_layout(spec)
  assert spec_c.out_shape() == tuple(
      spec.out_shape()[a] for a in conv_tucker.canonical_layout(spec)[2])

  def in_loop(fn):
    body = lambda dw, _: (dw + fn(x, g), None)
    return jax.jit(lambda: jax.lax.scan(body, jnp.zeros_like(want), None,
                                        length=1)[0])()

  got = in_loop(lambda x, g: conv_tucker.canonical_weight_grad(spec, x, g))
  assert rel_err(got, want) <= TOL["float32"]


@pytest.mark.parametrize("name", [c.name for c in GRID_BY_NAME.values()
                                  if c.kwargs.get("feature_group_count", 1)
                                  > 1])
def test_grouped_weight_grad_by_taps_matches_the_spec(name):
  case = GRID_BY_NAME[name]
  x, w = case.operands("float32", seed=3)
  spec, g = _spec_and_cotangent(case, x, w)
  got = jax.jit(lambda x, g: conv_tucker.canonical_weight_grad(spec, x, g))(
      x, g)
  assert rel_err(got, spec.weight_grad(x, g)) <= TOL["float32"]


@settings(max_examples=25, deadline=None, database=None)
@given(conv_cases())
def test_canonical_weight_grad_in_a_loop_fuzz(drawn):
  """Random layouts, strides, dilations, pads and groups, in a loop body."""
  case, _ = drawn
  x, w = case.operands("float32", seed=3)
  spec, g = _spec_and_cotangent(case, x, w)
  want = spec.weight_grad(x, g)
  body = lambda dw, _: (
      dw + conv_tucker.canonical_weight_grad(spec, x, g), None)
  got = jax.jit(lambda: jax.lax.scan(body, jnp.zeros_like(want), None,
                                     length=1)[0])()
  assert rel_err(got, want) <= TOL["float32"], case.name


def _loop_convs(jaxpr):
  """The conv_general_dilated equations inside the loop bodies of ``jaxpr``."""
  found = []

  def walk(jp, in_loop):
    for eqn in jp.eqns:
      if eqn.primitive.name == "conv_general_dilated" and in_loop:
        found.append(eqn)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub, in_loop or eqn.primitive.name in ("scan", "while"))

  walk(jaxpr.jaxpr, False)
  return found


def test_slab_loop_of_a_depthwise_conv_has_no_batch_grouped_convolution():
  """XLA:CPU's batch-grouped weight gradient is 29x slower in a loop body.

  MobileNetV2's 3x3 depthwise convolution of 960 channels at 7x7, batch 64:
  the SVD backward took 9.8 s in the slab loop, 0.34 s outside it. The loop
  now computes a grouped weight gradient tap by tap (no convolution).
  """
  x = jax.ShapeDtypeStruct((16, 7, 7, 96), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 1, 96), jnp.float32)
  spec = conv_lib.conv_spec(x, w, window_strides=(1, 1), padding="SAME",
                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                            feature_group_count=96)
  method = lv.methods.resolve("svd", eps=0.9)
  capacity = method.capacity(x.shape, spec.batch_axis)

  def run(x, g):
    res, _ = hosvd.tucker_compress(x, capacity, 0.9, "svd")
    return conv_tucker.weight_grad_conv(spec, res, g)

  rank = capacity[spec.batch_axis]
  assert conv_tucker.batch_rank_slabs(rank, 7 * 7 * 96, 16 * 7 * 7 * 96) > 1
  jaxpr = jax.make_jaxpr(run)(x, x)
  assert not [e for e in _loop_convs(jaxpr)
              if e.params["batch_group_count"] > 1]
