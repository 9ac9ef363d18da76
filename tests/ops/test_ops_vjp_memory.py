"""The orders the one custom VJP pins (ops/vjp.py), seen in XLA's buffers.

The figures are XLA:CPU's temp of compiled (never run) gradient programs,
in activations ``[8, 32, 32, 16]``, of three residual blocks
``x = relu(x + conv(relu(conv(x))))``; the bounds sit between the values
measured before and after the pins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
from lowrank_vjp._src.ops import dot as dot_lib
from lowrank_vjp._src.ops import vjp

_DN = ("NHWC", "HWIO", "NHWC")
_SHAPE = (8, 32, 32, 16)


def _blocks_temp(method: lv.methods.Method, blocks: int = 3) -> float:
  conv = lv.compressed_conv(method=method)

  def loss(ws, x):
    for w0, w1 in ws:
      h = lv.relu(conv(x, w0, (1, 1), "SAME", dimension_numbers=_DN))
      x = lv.relu(x + conv(h, w1, (1, 1), "SAME", dimension_numbers=_DN))
    return jnp.sum(x)

  w = jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32)
  x = jax.ShapeDtypeStruct(_SHAPE, jnp.float32)
  temp = lv.measure.xla_memory(jax.grad(loss), [(w, w)] * blocks, x
                               ).temp_bytes
  return temp / (np.prod(_SHAPE) * 4)


def test_residual_is_computed_before_the_op_output():
  """HOSVD's scaled copy of the input is freed before the conv's output.

  Before: 4.52 activations (the conv's output, its input, the block's
  input and the compression's scaled copy of the input alive together in
  the forward pass). Now the weight the conv reads depends on the residual:
  4.02.
  """
  temp = _blocks_temp(lv.methods.Hosvd(eps=0.9, on_overflow="ignore"))
  assert temp < 4.25, temp


def test_weight_gradient_is_computed_before_the_input_gradient():
  """The cotangent dies at the transposed conv, not after it.

  8-bit quantization: before, 5.85 activations (the cotangent kept until
  the weight gradient, after the input gradient and the skip addition had
  allocated theirs). With only this order pinned (the input gradient reads
  a weight that depends on the weight gradient) 5.41; with both pins 4.85.
  """
  temp = _blocks_temp(lv.methods.Quant(bits=8))
  assert temp < 5.6, temp


def test_pins_pass_through_the_weight_only_when_it_is_small():
  """A dense layer on fewer tokens than inputs is pinned through its output.

  (A select over a weight larger than the output would copy more than the
  order saves.) Its gradients are still JAX's own at ε = 1.
  """
  def op(tokens):
    return dot_lib.dot_spec(
        jax.ShapeDtypeStruct((tokens, 64), jnp.float32),
        jax.ShapeDtypeStruct((64, 64), jnp.float32),
        (((1,), (0,)), ((), ())))

  assert vjp._pin_through_weight(op(256))
  assert not vjp._pin_through_weight(op(4))

  dense = lv.compressed_dense(method="hosvd", eps=1.0)
  dims = (((1,), (0,)), ((), ()))
  x = jax.random.normal(jax.random.key(0), (4, 64))
  w = jax.random.normal(jax.random.key(1), (64, 64))
  got = jax.grad(lambda x, w: jnp.sum(jnp.sin(dense(x, w, dims))),
                 argnums=(0, 1))(x, w)
  want = jax.grad(lambda x, w: jnp.sum(jnp.sin(jax.lax.dot_general(
      x, w, dims))), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)


def _expansion_temps(method: lv.methods.Method) -> tuple[float, float]:
  """Forward and backward temp of an inverted-residual expansion.

  In expanded maps. MobileNetV2's pattern: a 1×1 expansion (16 → 96
  channels), a frozen BatchNorm's scale, lv.relu6 and a 3×3 stride-2
  depthwise convolution, both convolutions compressed by ``method``; each
  program alone (the forward returns the residuals, the backward takes
  them as arguments). The expansion's output gradient is the depthwise
  layer's input gradient times the mask and the scale.
  """
  n, s, cin, cexp = 16, 32, 16, 96
  x = jax.ShapeDtypeStruct((n, s, s, cin), jnp.float32)
  w1 = jax.ShapeDtypeStruct((1, 1, cin, cexp), jnp.float32)
  w2 = jax.ShapeDtypeStruct((3, 3, 1, cexp), jnp.float32)
  scale = jnp.linspace(0.5, 1.5, cexp)
  conv = lv.compressed_conv(method=method)

  def block(x, w1, w2):
    h = lv.relu6(conv(x, w1, (1, 1), "SAME", dimension_numbers=_DN) * scale)
    return conv(h, w2, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DN,
                feature_group_count=cexp)

  forward = lv.measure.xla_memory(lambda *a: jax.vjp(block, *a)[1],
                                  x, w1, w2).temp_bytes
  out, pullback = jax.eval_shape(
      lambda *a: jax.vjp(block, *a), x, w1, w2)
  backward = lv.measure.xla_memory(lambda f, g: f(g), pullback, out
                                   ).temp_bytes
  unit = n * s * s * cexp * 4
  return forward / unit, backward / unit


@pytest.mark.parametrize("method,bound", [
    (lv.methods.Hosvd(eps=0.9, on_overflow="ignore"), 1.75),
    (lv.methods.Svd(eps=0.9, on_overflow="ignore"), 1.75),
    (lv.methods.Quant(bits=8), 2.5),
    (lv.methods.GradFilter(), 1.75),
], ids=["hosvd", "svd", "quant-8", "gradfilter"])
def test_output_gradient_is_built_once(method, bound):
  """The expansion's output gradient is one buffer, built in place.

  Before, in expanded maps: HOSVD 3.50, SVD 3.50, quant-8 3.00, gradient
  filtering 2.29. XLA built the masked, scaled gradient twice (once whole
  for the input gradient, once as a matrix for the weight gradient's
  contraction) and a third time, one element of it, for the pin of the
  input gradient's kernel, keeping the depthwise layer's input gradient
  alive for all three; gradient filtering's cotangent fed two patch
  averages. Now the VJP passes ``g`` through ``schedule.computed_once``,
  pins the input gradient's kernel through the weight gradient only, and
  gradient filtering's gradients share one average
  (``Method.cotangent``): 2.01, 2.00, 2.00 and 1.29. Since the batch-rank
  slabs of the rank-space weight gradient also bound ``g ×_B U_Bᵀ`` (half of
  ``g`` here, and its transposed copy as much again), HOSVD and SVD 1.25.
  """
  temp = _expansion_temps(method)[1]
  assert temp < bound, temp


@pytest.mark.parametrize("method,bound", [
    (lv.methods.Hosvd(eps=0.9, on_overflow="ignore"), 1.75),
    (lv.methods.Svd(eps=0.9, on_overflow="ignore"), 1.75),
    (lv.methods.Quant(bits=8), 1.5),
    (lv.methods.GradFilter(), 1.5),
], ids=["hosvd", "svd", "quant-8", "gradfilter"])
def test_strided_layer_runs_before_its_compression(method, bound):
  """The depthwise layer's input is dead once the compression has read it.

  Before, in expanded maps: 2.00 for each method. The ReLU6 output and the
  compression's scaled copy (or codes' workspace) were alive together: the
  stride-2 convolution was pinned after its residual, so the ReLU6 output
  stayed alive for it, and XLA merged the scaled copy's division with the
  division of ``schedule.computed_once`` into one fusion that read the
  expansion's raw output again. Now an op whose output is at most a third
  of its input runs first (``vjp._op_first``) and ``divided_once`` hides
  its numerator's division: HOSVD 1.50, quant-8 1.00, gradient filtering
  1.25. SVD stayed at 2.00: its Gram and projection both read the scaled
  copy as a matrix, and XLA folded that reshape into the scaling's fusion,
  whose output could then not reuse the ReLU6 output's buffer; a reduction
  over the copy in its own shape (``tucker_compress``'s tie): 1.50.
  """
  temp = _expansion_temps(method)[0]
  assert temp < bound, temp

if __name__ == "__main__":
  pytest.main([__file__])
