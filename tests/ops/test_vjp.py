"""The one custom VJP: what it saves, and what it refuses.

Mirrors ``lowrank_vjp/_src/ops/vjp.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowrank_vjp as lv
from conv_cases import ONE_PIXEL_CASES, rel_err

DN = ("NHWC", "HWIO", "NHWC")
COMPRESSING = [lv.methods.Hosvd(eps=1.0), lv.methods.Svd(eps=1.0),
               lv.methods.Quant(bits=8), lv.methods.GradFilter(radius=2)]


def _conv(method):
  conv = lv.compressed_conv(method=method)
  return lambda x, w: conv(x, w, (1, 1), "SAME", dimension_numbers=DN)


def _data():
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (2, 6, 6, 3))
  w1 = jax.random.normal(k[1], (3, 3, 3, 3)) * 0.3
  w2 = jax.random.normal(k[2], (3, 3, 3, 2)) * 0.3
  return x, w1, w2


def _two_layers(method):
  first, second = _conv(lv.methods.Vanilla()), _conv(method)

  def loss(ws, x):
    return jnp.sum(jnp.tanh(second(jnp.tanh(first(x, ws[0])), ws[1])) ** 2)
  return loss


@pytest.mark.parametrize("method", COMPRESSING, ids=lambda m: m.label)
def test_meta_gradient_through_an_inner_step_raises(method):
  """MAML: differentiate the loss after one SGD step (was 0.43 off)."""
  x, w1, w2 = _data()
  loss = _two_layers(method)

  def meta(ws):
    g = jax.grad(loss)(ws, x)
    return loss(jax.tree_util.tree_map(lambda w, d: w - 0.1 * d, ws, g), x)

  with pytest.raises(lv.HigherOrderError, match="second-order"):
    jax.grad(meta)((w1, w2))
  with pytest.raises(lv.HigherOrderError):
    jax.hessian(lambda ws: loss(ws, x))((w1, w2))


def test_meta_gradient_with_vanilla_is_exact():
  x, w1, w2 = _data()
  loss = _two_layers(lv.methods.Vanilla())
  plain = lambda ws, x: jnp.sum(jnp.tanh(lax.conv_general_dilated(
      jnp.tanh(lax.conv_general_dilated(x, ws[0], (1, 1), "SAME",
                                        dimension_numbers=DN)),
      ws[1], (1, 1), "SAME", dimension_numbers=DN)) ** 2)

  def meta(loss):
    def f(ws):
      g = jax.grad(loss)(ws, x)
      return loss(jax.tree_util.tree_map(lambda w, d: w - 0.1 * d, ws, g), x)
    return jax.jit(jax.grad(f))((w1, w2))

  for a, b in zip(meta(loss), meta(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", COMPRESSING[:3], ids=lambda m: m.label)
def test_hessian_in_the_weight_of_a_layer_on_data_is_allowed(method):
  """No derivative passes through the residual: JAX's own answer."""
  x, w1, _ = _data()
  conv = _conv(method)
  f = lambda w: jnp.sum(jnp.tanh(conv(x, w)))
  ref = lambda w: jnp.sum(jnp.tanh(lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=DN)))
  # Jitted: op-by-op, the hessian's batched primitives compiled one by one.
  got, want = jax.jit(jax.hessian(f))(w1), jax.jit(jax.hessian(ref))(w1)
  scale = float(jnp.max(jnp.abs(want)))
  err = float(jnp.max(jnp.abs(got - want))) / scale
  assert err < (1e-5 if isinstance(method, lv.methods.TuckerMethod)
                else 0.1), err


def test_residual_holds_no_copy_of_the_input():
  x, w1, _ = _data()
  layer = _conv(lv.methods.Quant(bits=4))
  saved = jax.eval_shape(lambda x, w: jax.vjp(layer, x, w)[1], x, w1)
  shapes = [(l.shape, str(l.dtype)) for l in jax.tree_util.tree_leaves(saved)]
  assert (x.shape, "float32") not in shapes, shapes


def test_gradients_keep_the_operands_dtypes():
  x, w1, _ = _data()
  layer = _conv(lv.methods.Hosvd(eps=1.0))
  xb = x.astype(jnp.bfloat16)
  dx, dw = jax.jit(jax.grad(
      lambda x, w: jnp.sum(layer(x, w).astype(jnp.float32)),
      argnums=(0, 1)))(xb, w1.astype(jnp.bfloat16))
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Saved(lv.methods.Method):
  """Saves the input as it is: the weight gradient is the op's own."""

  def compress(self, x):
    return x

  def decompress(self, residual, like):
    return residual


@pytest.mark.parametrize("case", ONE_PIXEL_CASES, ids=str)
def test_exact_method_reproduces_lax_in_one_pixel_layouts(case):
  """A method that saves its input exactly gives lax's own gradients.

  One-pixel outputs in layouts that order batch and space differently: the
  weight gradient is a single-tap convolution, which XLA:CPU computes
  transposed inside a loop or conditional body (docs/methods.md). The
  custom VJP keeps the weight gradient out of such bodies (a conditional
  there made 8-bit quantization's weight gradient 114 % off in the CHWN
  case).
  """
  x, w = case.operands("float32", seed=3)
  conv = lv.compressed_conv(method=_Saved())

  def loss(conv):
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w, **case.lax_kwargs)))

  got = jax.jit(jax.grad(loss(conv), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.grad(loss(lax.conv_general_dilated), argnums=(0, 1)))(
      x, w)
  for a, b in zip(got, want, strict=True):
    assert rel_err(a, b) < 1e-5, rel_err(a, b)
