"""The trace-time log of compressed layers.

Mirrors ``lowrank_vjp/_src/measure/layer_log.py``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf
from lowrank_vjp._src.measure import layer_log

DN = ("NHWC", "HWIO", "NHWC")


def test_nothing_is_logged_outside_a_recording():
  conv = lv.compressed_conv(method="hosvd")
  x, w = jnp.ones((2, 4, 4, 3)), jnp.ones((3, 3, 3, 2))
  jax.eval_shape(lambda x, w: conv(x, w, (1, 1), "SAME",
                                   dimension_numbers=DN), x, w)
  with layer_log.recording() as log:
    pass
  assert log == []


def test_records_of_plain_calls():
  conv = lv.compressed_conv(method=lv.methods.Quant(bits=4))
  dense = lv.compressed_dense(method="svd", eps=0.8)
  x, w = jnp.ones((2, 4, 4, 3)), jnp.ones((3, 3, 3, 2))
  xd, wd = jnp.ones((5, 6)), jnp.ones((6, 2))

  def f(x, w, xd, wd):
    y = conv(x, w, (1, 1), "SAME", dimension_numbers=DN)
    y = conv(y[..., :1].repeat(3, -1), w, (1, 1), "SAME",
             dimension_numbers=DN)
    return y, dense(xd, wd, (((1,), (0,)), ((), ())))

  with layer_log.recording() as log:
    jax.eval_shape(f, x, w, xd, wd)
  assert [(r.name, r.kind, r.label) for r in log] == [
      ("conv_0", "conv", "quant"), ("conv_1", "conv", "quant"),
      ("dense_0", "dense", "svd")]
  assert log[0].method == lv.methods.Quant(bits=4)
  assert log[0].shape == (2, 4, 4, 3) and log[0].itemsize == 4
  # 96 elements at 4 bits in 32-bit words, plus one (lo, step) pair.
  assert log[0].formula_bytes == 4 * 12 + 8
  assert log[2].spec.kind == "dot"


def test_a_decorated_non_conv_function_is_not_logged():
  @lv.compressed_conv(method="hosvd", eps=1.0)
  def twice(x, w):
    return 2.0 * jnp.einsum("nc,co->no", x, w)

  with layer_log.recording() as log:
    jax.eval_shape(twice, jnp.ones((4, 3)), jnp.ones((3, 2)))
  assert log == []


def test_flax_layers_are_named_by_module_path():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      conv = nn.Conv(3, (3, 3), name="c",
                     conv_general_dilated_cls=lvf.conv_cls("hosvd"))
      x = conv(conv(x))          # the same layer twice
      return nn.Dense(2, name="head",
                      dot_general_cls=lvf.dense_cls("quant"))(x.mean((1, 2)))

  x = jnp.ones((2, 5, 5, 3))
  variables = jax.eval_shape(Net().init, jax.random.key(0), x)
  with layer_log.recording() as log:
    jax.eval_shape(Net().apply, variables, x)
  assert [r.name for r in log] == ["c", "c#1", "head"]
  assert layer_log.MODULES == (lvf.CompressedConvGeneralDilated.__name__,
                                lvf.CompressedDotGeneral.__name__)
