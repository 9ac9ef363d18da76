"""Tests for lowrank_vjp._src.ops.dot: the dense op and its compressed VJP.

``lhs`` is the activation (``[N, F]`` or ``[N, T, F]``), ``rhs`` the kernel.
At ε = 1 everything equals ``lax``; for ε < 1 the Tucker-space weight gradient
(:func:`dot.weight_grad_tucker`, ``DotSpec.tucker_weight_grad`` and the
Tucker methods' ``weight_grad``) equals the reference
``spec.weight_grad(res.reconstruct(), g)`` built from the same residual, and
the input gradient stays exact. The op's own ``input_grad`` and
``weight_grad`` equal ``jax.vjp`` of ``lax.dot_general``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import lowrank_vjp as lv
from lowrank_vjp._src.ops import dot as dot_lib
from lowrank_vjp._src.tensor import hosvd

TOL = {"float32": 1e-4, "float64": 1e-10}
METHODS = ("hosvd", "svd")


def _dn(lc, rc, lb=(), rb=()):
  return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


# (name, lhs shape, rhs shape, dimension_numbers)
CASES = [
    ("nf", (6, 5), (5, 3), _dn([1], [0])),
    ("nf_wide", (4, 16), (16, 3), _dn([1], [0])),    # F > N: dual Gram
    ("nf_batch1", (1, 7), (7, 4), _dn([1], [0])),
    ("ntf", (3, 4, 5), (5, 6), _dn([2], [0])),
    ("ntf_long", (2, 9, 3), (3, 4), _dn([2], [0])),
    ("ntf_kernel_of", (3, 4, 5), (6, 5), _dn([2], [1])),  # kernel [O, F]
    ("ntf_contract_tf", (3, 4, 5), (4, 5, 2), _dn([1, 2], [0, 1])),
    ("nft_contract_middle", (3, 5, 4), (5, 2), _dn([1], [0])),
    ("ntf_kernel_3d", (3, 4, 5), (5, 2, 3), _dn([2], [0])),
]
CASE_IDS = [c[0] for c in CASES]
BATCHED = [  # dot_general with batch dimensions: the reference path
    ("batch_btf", (3, 4, 5), (3, 5, 2), _dn([2], [1], [0], [0])),
    ("batch_bft_rhs_last", (2, 5, 4), (6, 5, 2), _dn([1], [1], [0], [2])),
]

F64_NAMES = ("nf_wide", "ntf", "ntf_contract_tf", "ntf_kernel_3d",
             "batch_bft_rhs_last")
PARAMS = (
    [pytest.param(*c, "float32", id=c[0]) for c in CASES + BATCHED]
    + [pytest.param(*c, "float64", id=c[0] + "-f64")
       for c in CASES + BATCHED if c[0] in F64_NAMES])


def _operands(lhs_shape, rhs_shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(lhs_shape), dtype)
  w = jnp.asarray(rng.standard_normal(rhs_shape), dtype)
  return x, w


def _rel_err(actual, expected) -> float:
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
  return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


def _forward_and_vjp(dot, x, w, dn, seed=1, **kwargs):
  out = jax.eval_shape(lambda a, b: lax.dot_general(a, b, dn, **kwargs), x, w)
  g = jnp.asarray(np.random.default_rng(seed).standard_normal(out.shape),
                  out.dtype)

  @jax.jit
  def run(x, w, g):
    y, vjp = jax.vjp(lambda a, b: dot(a, b, dn, **kwargs), x, w)
    return (y,) + vjp(g)

  return run(x, w, g)


def _errors_against_lax(dot, x, w, dn, **kwargs):
  got = _forward_and_vjp(dot, x, w, dn, **kwargs)
  want = _forward_and_vjp(lax.dot_general, x, w, dn, **kwargs)
  for a, b in zip(got, want, strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
  return [_rel_err(a, b) for a, b in zip(got, want, strict=True)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,lhs_shape,rhs_shape,dn,dtype", PARAMS)
def test_eps1_matches_lax(name, lhs_shape, rhs_shape, dn, method, dtype,
                          error_log):
  with jax.enable_x64(dtype == "float64"):
    x, w = _operands(lhs_shape, rhs_shape, dtype)
    dense = lv.compressed_dense(method=method, eps=1.0, on_overflow="error")
    errs = _errors_against_lax(dense, x, w, dn)
  err = error_log.record(f"dense_{dtype}", max(errs), f"{name}-{method}")
  assert errs[0] <= TOL[dtype] * 0.1, errs
  assert err <= TOL[dtype], errs


def _weight_grads(spec, x, g, eps, method):
  m = lv.methods.resolve(method, eps=eps, rank_fraction=1.0)
  capacity = m.capacity(x.shape, 0)

  @jax.jit
  def run(x, g):
    res, stats = hosvd.tucker_compress(x, capacity, eps, method)
    # "dispatch": the method's backward (the rank-space path, or the
    # reference where the op has none: with batch dimensions).
    grads = {"dispatch": m.weight_grad(spec, res, g),
             "reference": spec.weight_grad(
                 res.reconstruct(dtype=spec.lhs_dtype), g)}
    fast = spec.tucker_weight_grad(res, g)
    assert (fast is None) == bool(spec.dimension_numbers[1][0])
    if not spec.dimension_numbers[1][0]:
      grads["tucker"] = dot_lib.weight_grad_tucker(spec, res, g)
      grads["spec"] = fast
    return grads, stats, res.reconstruct(dtype=x.dtype)

  return run(x, g)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,lhs_shape,rhs_shape,dn,dtype", PARAMS)
def test_fast_weight_grad_matches_reference(name, lhs_shape, rhs_shape, dn,
                                            method, dtype):
  # The largest of N batch components holds >= 1/N of the energy.
  eps = 0.6 if method == "hosvd" else 0.3
  with jax.enable_x64(dtype == "float64"):
    x, w = _operands(lhs_shape, rhs_shape, dtype, seed=3)
    spec = dot_lib.dot_spec(x, w, dn)
    out = jax.eval_shape(spec.apply, x, w)
    g = jnp.asarray(np.random.default_rng(4).standard_normal(out.shape),
                    out.dtype)
    grads, stats, rebuilt = _weight_grads(spec, x, g, eps, method)
  assert not bool(stats.overflow)
  if lhs_shape[0] > 1:
    assert _rel_err(rebuilt, x) > 1e-2  # ε < 1 really truncated
  ref = grads["reference"]
  assert ref.shape == w.shape and ref.dtype == w.dtype
  for path, dw in grads.items():
    assert dw.shape == w.shape and dw.dtype == w.dtype, path
    assert _rel_err(dw, ref) <= TOL[dtype], (path, _rel_err(dw, ref))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,lhs_shape,rhs_shape,dn",
                         [CASES[1], CASES[3], CASES[6], BATCHED[0]],
                         ids=["nf_wide", "ntf", "ntf_contract_tf",
                              "batch_btf"])
def test_eps_below_one_forward_and_input_grad_exact(name, lhs_shape,
                                                    rhs_shape, dn, method):
  x, w = _operands(lhs_shape, rhs_shape, "float32", seed=5)
  dense = lv.compressed_dense(method=method, eps=0.3, on_overflow="ignore")
  got = _forward_and_vjp(dense, x, w, dn)
  want = _forward_and_vjp(lax.dot_general, x, w, dn)
  assert _rel_err(got[0], want[0]) <= 1e-6
  assert _rel_err(got[1], want[1]) <= 1e-6
  assert _rel_err(got[2], want[2]) > 1e-3  # the weight gradient is not


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,lhs_shape,rhs_shape,dn",
                         [CASES[0], CASES[4], CASES[6], BATCHED[1]],
                         ids=["nf", "ntf_long", "ntf_contract_tf",
                              "batch_bft_rhs_last"])
def test_check_grads_float64(name, lhs_shape, rhs_shape, dn, method, x64):
  x, w = _operands(lhs_shape, rhs_shape, "float64", seed=6)
  assert x.dtype == jnp.float64
  dense = lv.compressed_dense(method=method, eps=1.0, on_overflow="error")
  f = jax.jit(lambda x, w: dense(x, w, dn))
  check_grads(f, (x, w), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype,preferred,tol", [
    ("bfloat16", None, 3e-2), ("bfloat16", "float32", 3e-2),
    ("float32", "float32", 1e-4)])
@pytest.mark.parametrize("method", METHODS)
def test_dtypes_and_preferred_element_type(dtype, preferred, tol, method):
  dn = _dn([2], [0])
  x, w = _operands((3, 4, 8), (8, 5), dtype, seed=8)
  dense = lv.compressed_dense(method=method, eps=1.0, on_overflow="error")
  got = _forward_and_vjp(dense, x, w, dn, preferred_element_type=preferred)
  want = _forward_and_vjp(lax.dot_general, x, w, dn,
                          preferred_element_type=preferred)
  assert got[0].dtype == want[0].dtype == jnp.dtype(preferred or dtype)
  assert got[1].dtype == want[1].dtype == x.dtype
  assert got[2].dtype == want[2].dtype == w.dtype
  assert _rel_err(got[0], want[0]) == 0.0
  assert _rel_err(got[1], want[1]) <= tol
  assert _rel_err(got[2], want[2]) <= tol


def test_flax_style_dense_call_matches_lax():
  """What ``nn.Dense`` does: contract the last axis of ``[N, T, F]``."""
  x, w = _operands((2, 3, 6), (6, 4), "float32", seed=9)
  dn = _dn([x.ndim - 1], [0])
  dense = lv.compressed_dense(eps=1.0, on_overflow="error")
  y = dense(x, w, dn, precision=None, preferred_element_type=None,
            out_sharding=None)
  np.testing.assert_allclose(y, jnp.einsum("ntf,fo->nto", x, w), rtol=1e-5,
                             atol=1e-5)


# -------------------------------------------------------------- errors ---


@pytest.mark.parametrize("lhs_dtype,rhs_dtype,name", [
    (jnp.int32, jnp.float32, "lhs"), (jnp.float32, jnp.int32, "rhs"),
    (jnp.bool_, jnp.float32, "lhs")])
def test_integer_operands_raise_type_error(lhs_dtype, rhs_dtype, name):
  x = jnp.ones((4, 5), lhs_dtype)
  w = jnp.ones((5, 3), rhs_dtype)
  with pytest.raises(TypeError, match=name):
    lv.compressed_dense()(x, w, _dn([1], [0]))


@pytest.mark.parametrize("dn", [
    _dn([1], [1]),               # 5 vs 3
    _dn([2], [0]),               # no such axis
    "nonsense",
    (((1,), (0,)),),             # missing batch part
])
def test_bad_dimension_numbers_raise_value_error(dn):
  x, w = _operands((4, 5), (5, 3), "float32")
  with pytest.raises(ValueError, match="dimension_numbers|shape"):
    lv.compressed_dense()(x, w, dn)


@pytest.mark.parametrize("dn", [
    ((1,), (0,)),                # no batch part
    (((1,), (0,)), ((), ()), ()),
    ((("a",), (0,)), ((), ())),  # not an axis
])
def test_malformed_dimension_numbers_name_the_argument(dn):
  x, w = _operands((4, 5), (5, 3), "float32")
  with pytest.raises(ValueError, match="dimension_numbers"):
    dot_lib.dot_spec(x, w, dn)


# ------------------------------------------------------ the op itself ---


def test_dot_spec_resolves_and_is_hashable():
  x, w = _operands((3, 4, 5), (5, 6), "float32")
  spec = dot_lib.dot_spec(x, w, [[[2], [0]], [[], []]],
                          precision=[lax.Precision.HIGHEST] * 2,
                          preferred_element_type="float32")
  assert spec.dimension_numbers == (((2,), (0,)), ((), ()))
  assert spec.precision == (lax.Precision.HIGHEST,) * 2
  assert spec.preferred_element_type == jnp.dtype("float32")
  assert (spec.lhs_shape, spec.rhs_shape) == ((3, 4, 5), (5, 6))
  assert spec.kind == "dot"
  assert (spec.batch_axis, spec.channel_axis) == (0, 2)
  assert spec.out_shape() == (3, 4, 6)
  again = dot_lib.dot_spec(jnp.zeros_like(x), jnp.zeros_like(w),
                           (((2,), (0,)), ((), ())),
                           precision=(lax.Precision.HIGHEST,) * 2,
                           preferred_element_type=jnp.float32)
  assert again == spec and hash(again) == hash(spec)
  for value in vars(spec).values():
    assert not isinstance(value, (jax.Array, np.ndarray))
  np.testing.assert_array_equal(
      spec.apply(x, w), lax.dot_general(x, w, spec.dimension_numbers,
                                        precision=lax.Precision.HIGHEST))


@pytest.mark.parametrize("lhs_shape,rhs_shape,dn,batch_axis,channel_axis", [
    ((6, 5), (5, 3), _dn([1], [0]), 0, 1),
    ((3, 4, 5), (4, 5, 2), _dn([1, 2], [0, 1]), 0, 2),
    ((3, 4, 5), (3, 5, 2), _dn([2], [1], [0], [0]), 0, 2),
    ((3, 4, 5), (5, 4, 2), _dn([1], [1], [2], [0]), 2, 1)])
def test_batch_and_channel_axes(lhs_shape, rhs_shape, dn, batch_axis,
                                channel_axis):
  x, w = _operands(lhs_shape, rhs_shape, "float32")
  spec = dot_lib.dot_spec(x, w, dn)
  assert (spec.batch_axis, spec.channel_axis) == (batch_axis, channel_axis)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name,lhs_shape,rhs_shape,dn,dtype", PARAMS)
def test_op_grads_equal_jax_vjp(name, lhs_shape, rhs_shape, dn, dtype, jit):
  with jax.enable_x64(dtype == "float64"):
    x, w = _operands(lhs_shape, rhs_shape, dtype, seed=10)
    other = _operands(lhs_shape, rhs_shape, dtype, seed=11)[0]
    spec = dot_lib.dot_spec(x, w, dn)
    g = jnp.asarray(np.random.default_rng(12).standard_normal(
        spec.out_shape()), dtype)
    input_grad = jax.jit(spec.input_grad) if jit else spec.input_grad
    weight_grad = jax.jit(spec.weight_grad) if jit else spec.weight_grad
    dx, dw = input_grad(w, g), weight_grad(other, g)
    want_dx = jax.vjp(lambda a: lax.dot_general(a, w, dn), x)[1](g)[0]
    want_dw = jax.vjp(lambda b: lax.dot_general(other, b, dn), w)[1](g)[0]
  assert dx.shape == x.shape and dx.dtype == x.dtype
  assert dw.shape == w.shape and dw.dtype == w.dtype
  assert _rel_err(dx, want_dx) <= TOL[dtype], name
  assert _rel_err(dw, want_dw) <= TOL[dtype], name
