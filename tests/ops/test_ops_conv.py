"""Tests for lowrank_vjp._src.ops.conv: the convolution op and its VJP.

:func:`conv_spec` resolves and validates a ``lax.conv_general_dilated`` call
into a hashable :class:`ConvSpec`; its exact input gradient and reference
weight gradient must equal ``jax.vjp`` of ``lax.conv_general_dilated``. Run
through the compressed VJP at ε = 1 the convolution must reproduce ``lax``
(forward, input and weight gradients) to round-off, and for ε < 1 the
forward and the input gradient must stay exact. (The fast weight-gradient
paths for ε < 1 are tested in test_ops_conv_tucker.py.)

Grid size (test_eps1_matches_lax): 34 convolutions × 2 methods = 68 float32
cases, plus 6 convolutions × 2 methods = 12 float64 cases: 80 cases.
Fuzz (hypothesis): 8 float32 and 4 float64 random convolutions (1-3 spatial
dims, random layouts, strides, dilations, asymmetric padding,
groups).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_cases import (
  BATCH_GROUP,
  GRID,
  GRID_BY_NAME,
  METHODS,
  NCHW,
  NHWC,
  SPATIAL,
  TOL,
  Case,
  compare_to_lax,
  cotangent,
  forward_and_vjp,
  rel_err,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

import lowrank_vjp as lv
from lowrank_vjp._src.ops import conv as conv_lib

F64_NAMES = ("asym_pad_stride2", "lhs_dil21_stride2", "depthwise_mult2_stride2",
             "nchw_stride2_asym", "conv1d_ncw_dilated",
             "conv3d_grouped_stride_dil")
GRID_PARAMS = (
    [pytest.param(c, "float32", id=c.name) for c in GRID]
    + [pytest.param(GRID_BY_NAME[n], "float64", id=n + "-f64")
       for n in F64_NAMES])
assert len(GRID) * len(METHODS) == 68
assert len(GRID_PARAMS) * len(METHODS) == 80


# ------------------------------------------------------- (a) ε = 1 grid ---


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case,dtype", GRID_PARAMS)
def test_eps1_matches_lax(case, dtype, method, error_log):
  with jax.enable_x64(dtype == "float64"):
    x, w = case.operands(dtype)
    assert x.dtype == jnp.dtype(dtype)
    conv = lv.compressed_conv(method=method, eps=1.0, on_overflow="error")
    errs = compare_to_lax(conv, x, w, case.lax_kwargs)
  err = error_log.record(f"conv_grid_{dtype}", max(errs),
                         f"{case.name}-{method}")
  assert errs[0] <= TOL[dtype] * 0.1, errs  # the forward is lax's own
  assert err <= TOL[dtype], errs


def test_grid_covers_the_brief():
  """The grid holds every setting the ε = 1 check must cover."""
  kws = [c.kwargs for c in GRID]
  assert {c.kwargs["window_strides"][0] for c in GRID} >= {1, 2}
  pads = [k["padding"] for k in kws]
  assert {"SAME", "VALID"} <= {p for p in pads if isinstance(p, str)}
  assert any(not isinstance(p, str) and any(lo != hi for lo, hi in p)
             for p in pads)
  assert any(k.get("rhs_dilation", (1,))[0] > 1 for k in kws)
  assert all(isinstance(k["padding"], tuple) for k in kws
             if any(d > 1 for d in k.get("lhs_dilation", (1,))))
  assert any(k.get("feature_group_count", 1) == c.c > 1
             for c, k in zip(GRID, kws, strict=True))
  assert any(1 < k.get("feature_group_count", 1) < c.c
             for c, k in zip(GRID, kws, strict=True))
  assert {c.layout for c in GRID} >= {NHWC, NCHW}
  assert {c.kernel[:2] for c in GRID} >= {(1, 1), (3, 3), (5, 5)}
  assert any(s % 2 for c in GRID for s in c.sizes)
  assert any(c.n == 1 for c in GRID)
  assert {len(c.sizes) for c in GRID} == {1, 2, 3}


# ------------------------------------------------- (b) hypothesis fuzz ---


@st.composite
def conv_cases(draw):
  """Random valid convolutions with 1, 2 or 3 spatial dimensions."""
  nsp = draw(st.sampled_from([1, 2, 3]))
  letters = SPATIAL[nsp]
  n = draw(st.integers(1, 3))
  grouping = draw(st.sampled_from(["none", "grouped", "depthwise"]))
  if grouping == "none":
    groups, c_per = 1, draw(st.integers(1, 4))
  elif grouping == "grouped":
    groups, c_per = draw(st.integers(2, 3)), draw(st.integers(2, 3))
  else:
    groups, c_per = draw(st.integers(2, 4)), 1
  c = groups * c_per
  o = groups * draw(st.integers(1, 2))
  max_size = {1: 9, 2: 7, 3: 4}[nsp]
  sizes, kernel, strides, lhs_dil, rhs_dil = [], [], [], [], []
  for _ in range(nsp):
    sizes.append(draw(st.integers(2, max_size)))
    kernel.append(draw(st.integers(1, 3)))
    strides.append(draw(st.integers(1, 3)))
    lhs_dil.append(draw(st.sampled_from([1, 1, 2])))
    rhs_dil.append(draw(st.sampled_from([1, 1, 2])))
  pad_kind = draw(st.sampled_from(["SAME", "VALID", "explicit", "explicit"]))
  if any(d > 1 for d in lhs_dil):
    pad_kind = "explicit"
  if pad_kind == "explicit":
    padding = []
    for s, k, ld, rd in zip(sizes, kernel, lhs_dil, rhs_dil, strict=True):
      # Non-negative: XLA:CPU miscomputes some negative pads (see GRID).
      lo, hi = draw(st.integers(0, 3)), draw(st.integers(0, 3))
      short = ((k - 1) * rd + 1) - ((s - 1) * ld + 1 + lo + hi)
      if short > 0:  # keep at least one output position
        hi += short
      padding.append((lo, hi))
    padding = tuple(padding)
  else:
    padding = pad_kind
    for i, (s, k, rd) in enumerate(zip(sizes, kernel, rhs_dil, strict=True)):
      sizes[i] = max(s, (k - 1) * rd + 1)  # VALID needs the window to fit
  lhs = "".join(draw(st.permutations("NC" + letters)))
  rhs = "".join(draw(st.permutations("OI" + letters)))
  out = "".join(draw(st.permutations("NC" + letters)))
  kwargs = dict(window_strides=tuple(strides), padding=padding,
                lhs_dilation=tuple(lhs_dil), rhs_dilation=tuple(rhs_dil),
                feature_group_count=groups)
  name = (f"{nsp}d n={n} c={c} o={o} sizes={sizes} k={kernel} {kwargs} "
          f"{(lhs, rhs, out)}")
  case = Case(name, n, c, o, tuple(sizes), tuple(kernel), (lhs, rhs, out),
              kwargs)
  method = draw(st.sampled_from(METHODS))
  return case, method


def _fuzz(case, method, dtype, error_log):
  with jax.enable_x64(dtype == "float64"):
    x, w = case.operands(dtype, seed=3)
    conv = lv.compressed_conv(method=method, eps=1.0, on_overflow="error")
    errs = compare_to_lax(conv, x, w, case.lax_kwargs)
  err = error_log.record(f"conv_fuzz_{dtype}", max(errs),
                         f"{case.name} {method}")
  assert err <= TOL[dtype], (errs, case.name, method)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv_cases())
def test_fuzz_eps1_matches_lax_float32(error_log, drawn):
  _fuzz(*drawn, "float32", error_log)


@settings(max_examples=4, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv_cases())
def test_fuzz_eps1_matches_lax_float64(error_log, drawn):
  _fuzz(*drawn, "float64", error_log)


# ---------------------------------------------------- (c) check_grads ---


@pytest.mark.parametrize("name,method", [
    ("asym_pad_stride2", "hosvd"),
    ("nchw_grouped2", "svd"),
    ("conv1d_ncw_dilated", "hosvd"),
])
def test_check_grads_float64(name, method, x64):
  case = GRID_BY_NAME[name]
  x, w = case.operands("float64", seed=5)
  assert x.dtype == jnp.float64
  conv = lv.compressed_conv(method=method, eps=1.0, on_overflow="error")
  f = jax.jit(lambda x, w: conv(x, w, **case.lax_kwargs))
  check_grads(f, (x, w), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


# ------------------------- (d) ε < 1: forward and input gradient exact ---


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", [
    "stride2_same_odd", "lhs_dil2", "nchw_grouped2", "conv3d_same"])
def test_eps_below_one_forward_and_input_grad_exact(name, method):
  case = GRID_BY_NAME[name]
  x, w = case.operands("float32", seed=17)
  conv = lv.compressed_conv(method=method, eps=0.6, on_overflow="ignore")
  got = forward_and_vjp(conv, x, w, case.lax_kwargs)
  want = forward_and_vjp(lax.conv_general_dilated, x, w, case.lax_kwargs)
  assert rel_err(got[0], want[0]) <= 1e-6
  assert rel_err(got[1], want[1]) <= 1e-6
  # ... while the weight gradient is approximate (so ε < 1 took effect).
  assert rel_err(got[2], want[2]) > 1e-3


# --------------------------------------------- (e) batch_group_count > 1 ---


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", BATCH_GROUP, ids=str)
def test_batch_group_count_eps1_matches_lax(case, method):
  x, w = case.operands("float32")
  conv = lv.compressed_conv(method=method, eps=1.0, on_overflow="error")
  errs = compare_to_lax(conv, x, w, case.lax_kwargs)
  assert max(errs) <= TOL["float32"], errs


# ----------------------------- (f) preferred_element_type and bfloat16 ---


@pytest.mark.parametrize("name,method", [("nchw_grouped2", "hosvd"),
                                         ("stride2_same_odd", "svd")])
@pytest.mark.parametrize("dtype,preferred,tol", [
    ("bfloat16", None, 3e-2),
    ("bfloat16", "float32", 3e-2),
    ("float16", "float32", 3e-3),
])
def test_dtypes_and_preferred_element_type(name, method, dtype, preferred,
                                           tol):
  case = GRID_BY_NAME[name]
  x, w = case.operands(dtype, seed=19)
  kwargs = dict(case.lax_kwargs, preferred_element_type=preferred)
  conv = lv.compressed_conv(method=method, eps=1.0, on_overflow="error")
  got = forward_and_vjp(conv, x, w, kwargs)
  want = forward_and_vjp(lax.conv_general_dilated, x, w, kwargs)
  assert got[0].dtype == want[0].dtype == jnp.dtype(preferred or dtype)
  assert got[1].dtype == want[1].dtype == x.dtype
  assert got[2].dtype == want[2].dtype == w.dtype
  assert rel_err(got[0], want[0]) == 0.0  # the forward is lax's own
  assert rel_err(got[1], want[1]) <= tol
  assert rel_err(got[2], want[2]) <= tol


# ------------------------------- (g) conv_spec: resolution and validation ---


X = jnp.ones((2, 7, 9, 3))
W = jnp.ones((3, 2, 3, 4))


@pytest.mark.parametrize("padding", ["SAME", "VALID", "SAME_LOWER", "same",
                                     "valid"])
@pytest.mark.parametrize("strides,rhs_dilation", [
    ((1, 1), (1, 1)), ((2, 3), (1, 1)), ((1, 2), (2, 1)), ((3, 2), (2, 3))])
def test_string_padding_resolves_to_lax_pairs(padding, strides, rhs_dilation):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 11, 12, 3)),
                  jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 3, 4)),
                  jnp.float32)
  spec = conv_lib.conv_spec(x, w, strides, padding, rhs_dilation=rhs_dilation,
                            dimension_numbers=NHWC)
  eff = [(k - 1) * d + 1 for k, d in zip((3, 2), rhs_dilation, strict=True)]
  want = lax.padtype_to_pads((11, 12), eff, strides, padding.upper())
  assert spec.padding == tuple(tuple(int(v) for v in p) for p in want)
  assert all(type(v) is int for p in spec.padding for v in p)
  # The explicit pairs compute what lax computes from the string.
  np.testing.assert_array_equal(
      spec.apply(x, w),
      lax.conv_general_dilated(x, w, strides, padding.upper(),
                               rhs_dilation=rhs_dilation,
                               dimension_numbers=NHWC))


@pytest.mark.parametrize("padding,want", [
    ([(1, 2), (0, 1)], ((1, 2), (0, 1))),
    (((1, 1), (2, 2)), ((1, 1), (2, 2))),
    ([[0, 0], [3, 0]], ((0, 0), (3, 0))),
    ([(np.int64(1), np.int32(0)), (-1, 2)], ((1, 0), (-1, 2))),
])
def test_explicit_padding_becomes_int_pairs(padding, want):
  spec = conv_lib.conv_spec(X, W, (1, 1), padding, dimension_numbers=NHWC)
  assert spec.padding == want
  assert all(type(v) is int for p in spec.padding for v in p)
  hash(spec)


@pytest.mark.parametrize("layout,lhs_shape,rhs_shape", [
    (NHWC, (2, 7, 9, 3), (3, 2, 3, 4)),
    (NCHW, (2, 3, 7, 9), (4, 3, 3, 2)),
    (("NHWC", "OIHW", "NCHW"), (2, 7, 9, 3), (4, 3, 3, 2)),
    (("HWNC", "IOHW", "CNHW"), (7, 9, 2, 3), (3, 4, 3, 2)),
    (("NWC", "WIO", "NWC"), (2, 9, 3), (3, 3, 4)),
    (("NCDHW", "OIDHW", "NDHWC"), (2, 3, 5, 6, 7), (4, 3, 3, 2, 2)),
])
def test_dimension_numbers_resolve_like_lax(layout, lhs_shape, rhs_shape):
  x = jnp.asarray(np.random.default_rng(2).standard_normal(lhs_shape),
                  jnp.float32)
  w = jnp.asarray(np.random.default_rng(3).standard_normal(rhs_shape),
                  jnp.float32)
  nsp = len(lhs_shape) - 2
  spec = conv_lib.conv_spec(x, w, (1,) * nsp, "SAME",
                            dimension_numbers=layout)
  dnums = lax.conv_dimension_numbers(lhs_shape, rhs_shape, layout)
  assert spec.dimension_numbers == dnums
  assert isinstance(spec.dimension_numbers, lax.ConvDimensionNumbers)
  assert spec.batch_axis == layout[0].index("N")
  assert spec.channel_axis == layout[0].index("C")
  assert spec.num_spatial == nsp
  assert spec.lhs_shape == lhs_shape and spec.rhs_shape == rhs_shape
  # A ConvDimensionNumbers value resolves to itself.
  again = conv_lib.conv_spec(x, w, (1,) * nsp, "SAME",
                             dimension_numbers=dnums)
  assert again == spec and hash(again) == hash(spec)
  y = lax.conv_general_dilated(x, w, (1,) * nsp, "SAME",
                               dimension_numbers=layout)
  np.testing.assert_array_equal(spec.apply(x, w), y)
  assert spec.out_shape() == y.shape
  aval = spec.lhs_aval()
  assert (aval.shape, aval.dtype) == (lhs_shape, jnp.float32)
  aval = spec.rhs_aval()
  assert (aval.shape, aval.dtype) == (rhs_shape, jnp.float32)


def test_defaults_and_scalar_settings():
  x, w = jnp.ones((2, 3, 7, 9)), jnp.ones((4, 3, 3, 2))
  spec = conv_lib.conv_spec(x, w, 2, "VALID")  # lax's default layout: NCHW
  assert spec.dimension_numbers == lax.conv_dimension_numbers(
      x.shape, w.shape, None)
  assert (spec.batch_axis, spec.channel_axis) == (0, 1)
  assert spec.window_strides == (2, 2)
  assert spec.lhs_dilation == (1, 1) and spec.rhs_dilation == (1, 1)
  assert spec.feature_group_count == 1 and spec.batch_group_count == 1
  assert spec.precision is None and spec.preferred_element_type is None
  assert spec.kind == "conv"
  spec = conv_lib.conv_spec(x, w, (1, np.int64(2)), "VALID", lhs_dilation=1,
                            rhs_dilation=(2, 1),
                            precision=[lax.Precision.HIGHEST] * 2,
                            preferred_element_type="float32")
  assert spec.window_strides == (1, 2) and spec.lhs_dilation == (1, 1)
  assert spec.rhs_dilation == (2, 1)
  assert spec.precision == (lax.Precision.HIGHEST,) * 2  # a list, hashable
  assert spec.preferred_element_type == jnp.dtype("float32")
  hash(spec)


def test_spec_is_hashable_and_holds_no_arrays():
  a = conv_lib.conv_spec(X, W, (1, 1), "SAME", dimension_numbers=NHWC)
  b = conv_lib.conv_spec(jnp.zeros_like(X), jnp.zeros_like(W), [1, 1],
                         "SAME", dimension_numbers=NHWC)
  c = conv_lib.conv_spec(X, W, (2, 1), "SAME", dimension_numbers=NHWC)
  assert a == b and hash(a) == hash(b)
  assert a != c
  assert len({a, b, c}) == 2
  for value in vars(a).values():
    assert not isinstance(value, (jax.Array, np.ndarray))
  # Usable as a static argument.
  f = jax.jit(lambda spec, x, w: spec.apply(x, w), static_argnums=0)
  np.testing.assert_array_equal(f(a, X, W), a.apply(X, W))


def test_spec_under_jit_records_the_tracers_types():
  @jax.jit
  def f(x, w):
    spec = conv_lib.conv_spec(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    assert spec.lhs_shape == X.shape and spec.rhs_shape == W.shape
    assert spec.lhs_dtype == jnp.float32
    return spec.apply(x, w)

  np.testing.assert_array_equal(
      f(X, W), lax.conv_general_dilated(X, W, (1, 1), "SAME",
                                        dimension_numbers=NHWC))


@pytest.mark.parametrize("name", ["window_strides", "lhs_dilation",
                                  "rhs_dilation"])
@pytest.mark.parametrize("value", [0, -1, (1,), (1, 2, 3), (True, 1),
                                   (1.5, 1), (0, 1), (1, -2), "ab"])
def test_bad_strides_and_dilations_name_the_argument(name, value):
  kw = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)),
            dimension_numbers=NHWC)
  kw[name] = value
  with pytest.raises(ValueError, match=name) as info:
    conv_lib.conv_spec(X, W, **kw)
  message = str(info.value)
  assert "2 positive ints" in message  # what is allowed
  shown = (value,) * 2 if isinstance(value, int) else tuple(value)
  assert repr(shown) in message      # and the value given


@pytest.mark.parametrize("padding", [
    "FULL", "", [(1, 1)], [(1, 1), (1, 1), (1, 1)], 3, None,
    [(1, 2, 3), (1, 1)], [("a", "b"), (1, 1)], [1, 1]])
def test_bad_padding_names_the_argument(padding):
  with pytest.raises(ValueError, match="padding") as info:
    conv_lib.conv_spec(X, W, (1, 1), padding, dimension_numbers=NHWC)
  assert repr(padding) in str(info.value)


def test_string_padding_with_lhs_dilation_is_refused():
  with pytest.raises(ValueError, match="lhs_dilation"):
    conv_lib.conv_spec(X, W, (1, 1), "SAME", lhs_dilation=(2, 1),
                       dimension_numbers=NHWC)
  # Explicit pairs are fine.
  conv_lib.conv_spec(X, W, (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 1),
                     dimension_numbers=NHWC)


@pytest.mark.parametrize("name", ["feature_group_count",
                                  "batch_group_count"])
@pytest.mark.parametrize("value", [0, -2, True, 1.5, "2", None])
def test_bad_group_counts_name_the_argument(name, value):
  with pytest.raises(ValueError, match=name):
    conv_lib.conv_spec(X, W, (1, 1), "SAME", dimension_numbers=NHWC,
                       **{name: value})


@pytest.mark.parametrize("name,value,w_shape", [
    ("feature_group_count", 2, (3, 2, 3, 4)),   # 2 does not divide C = 3
    ("feature_group_count", 3, (3, 2, 3, 4)),   # rhs has 3 inputs, not 1
    ("batch_group_count", 3, (3, 2, 3, 4)),     # 3 does not divide N = 2
    ("batch_group_count", 2, (3, 2, 3, 3)),     # 2 does not divide O = 3
])
def test_groups_that_do_not_fit_the_shapes_raise(name, value, w_shape):
  with pytest.raises(ValueError, match=name) as info:
    conv_lib.conv_spec(X, jnp.ones(w_shape), (1, 1), "SAME",
                       dimension_numbers=NHWC, **{name: value})
  assert str(X.shape) in str(info.value) and str(w_shape) in str(info.value)


@pytest.mark.parametrize("lhs_dtype,rhs_dtype,name", [
    (jnp.int32, jnp.float32, "lhs"), (jnp.float32, jnp.int32, "rhs"),
    (jnp.bool_, jnp.float32, "lhs"), (jnp.float32, jnp.uint8, "rhs"),
    (jnp.complex64, jnp.complex64, "lhs")])
def test_non_float_operands_raise_type_error(lhs_dtype, rhs_dtype, name):
  x, w = jnp.ones(X.shape, lhs_dtype), jnp.ones(W.shape, rhs_dtype)
  with pytest.raises(TypeError, match=f"{name} must have a floating dtype"):
    conv_lib.conv_spec(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  with pytest.raises(TypeError, match=name):
    lv.compressed_conv()(x, w, (1, 1), "SAME", dimension_numbers=NHWC)


@pytest.mark.parametrize("x_shape,w_shape", [
    ((2, 7, 9, 3), (3, 3, 4)), ((7, 3), (3, 4)),
    ((2, 7, 9, 3), (1, 3, 2, 3, 4))])
def test_operand_ranks_must_match(x_shape, w_shape):
  with pytest.raises(ValueError, match="dimensions") as info:
    conv_lib.conv_spec(jnp.ones(x_shape), jnp.ones(w_shape), (1,), "SAME")
  assert str(x_shape) in str(info.value) and str(w_shape) in str(info.value)


@pytest.mark.parametrize("dn", [
    ("NHWC", "HWIO", "NCHWX"), ("NHWC", "HWIO"), ("NHWX", "HWIO", "NHWC"),
    "nonsense"])
def test_bad_dimension_numbers_raise_value_error(dn):
  with pytest.raises(ValueError, match="dimension_numbers"):
    conv_lib.conv_spec(X, W, (1, 1), "SAME", dimension_numbers=dn)


def test_shapes_that_do_not_convolve_raise():
  with pytest.raises(ValueError, match="do not form a valid convolution"):
    conv_lib.conv_spec(X, jnp.ones((3, 3, 5, 4)), (1, 1), "SAME",
                       dimension_numbers=NHWC)  # 5 input channels, not 3


# ------------------- (h) the op's gradients equal jax.vjp of lax's conv ---


OP_GRAD_PARAMS = (
    [pytest.param(GRID_BY_NAME[n], "float32", id=n) for n in (
        "base_3x3_same", "stride12_same_lower", "negative_pad",
        "lhs_and_rhs_dil", "depthwise_mult2_stride2", "nchw_stride2_asym",
        "mixed_layout", "conv1d_ncw_dilated", "conv3d_grouped_stride_dil")]
    + [pytest.param(c, "float32", id=c.name) for c in BATCH_GROUP]
    + [pytest.param(GRID_BY_NAME["grouped2"], "float64", id="grouped2-f64")])


def _lax_vjp(case, x, w, g, **extra):
  kw = dict(case.lax_kwargs, **extra)
  _, vjp = jax.vjp(lambda a, b: lax.conv_general_dilated(a, b, **kw), x, w)
  return vjp(g)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case,dtype", OP_GRAD_PARAMS)
def test_input_grad_equals_jax_vjp(case, dtype, jit):
  with jax.enable_x64(dtype == "float64"):
    x, w = case.operands(dtype, seed=23)
    spec = conv_lib.conv_spec(x, w, **case.lax_kwargs)
    g = cotangent(spec.out_shape(), x.dtype, 24)
    fn = jax.jit(spec.input_grad) if jit else spec.input_grad
    dx = fn(w, g)
    want = _lax_vjp(case, x, w, g)[0]
  assert dx.shape == x.shape and dx.dtype == x.dtype
  assert rel_err(dx, want) <= TOL[dtype], rel_err(dx, want)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case,dtype", OP_GRAD_PARAMS)
def test_weight_grad_equals_jax_vjp(case, dtype, jit):
  with jax.enable_x64(dtype == "float64"):
    x, w = case.operands(dtype, seed=25)
    spec = conv_lib.conv_spec(x, w, **case.lax_kwargs)
    g = cotangent(spec.out_shape(), x.dtype, 26)
    # At an input other than the one the spec was made from.
    other = cotangent(x.shape, x.dtype, 27)
    fn = jax.jit(spec.weight_grad) if jit else spec.weight_grad
    dw = fn(other, g)
    want = _lax_vjp(case, other, w, g)[1]
  assert dw.shape == w.shape and dw.dtype == w.dtype
  assert rel_err(dw, want) <= TOL[dtype], rel_err(dw, want)


@pytest.mark.parametrize("dtype,preferred", [
    ("bfloat16", None), ("bfloat16", "float32"), ("float16", "float32")])
def test_op_grads_with_preferred_element_type(dtype, preferred):
  case = GRID_BY_NAME["nchw_grouped2"]
  x, w = case.operands(dtype, seed=28)
  spec = conv_lib.conv_spec(x, w, **case.lax_kwargs,
                            preferred_element_type=preferred)
  assert spec.out_dtype() == jnp.dtype(preferred or dtype)
  g = cotangent(spec.out_shape(), spec.out_dtype(), 29)
  want_dx, want_dw = _lax_vjp(case, x, w, g, preferred_element_type=preferred)
  dx, dw = spec.input_grad(w, g), spec.weight_grad(x, g)
  assert dx.dtype == want_dx.dtype and dw.dtype == want_dw.dtype
  assert rel_err(dx, want_dx) <= 1e-2
  assert rel_err(dw, want_dw) <= 1e-2
