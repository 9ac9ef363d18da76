"""Memory report, full-size residual check, XLA bytes per block by method."""

from __future__ import annotations

import importlib.util
import math
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf
import lowrank_vjp.rules as lvr
from lowrank_vjp._src.measure import layer_log as layer_log

DN = ("NHWC", "HWIO", "NHWC")
_EXPERIMENT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                           "experiments", "memory_blocks.py")


def _experiment():
  spec = importlib.util.spec_from_file_location("memory_blocks", _EXPERIMENT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


RULES = {
    "c_none": dict(method="none"),
    "c_hosvd": dict(method="hosvd", eps=0.9, on_overflow="ignore"),
    "c_svd": dict(method="svd", eps=0.9, on_overflow="ignore"),
    "c_gf": dict(method="gradfilter", radius=2),
    "c_q8": dict(method="quant", bits=8, per_channel=True),
    "c_q4": dict(method="quant", bits=4),
    "c_ckpt": dict(method="checkpoint"),
}


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    for name, rule in RULES.items():
      x = nn.Conv(6, (3, 3), name=name,
                  conv_general_dilated_cls=lvf.conv_cls(**rule))(x)
      x = lv.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(3, name="head",
                    dot_general_cls=lvf.dense_cls(method="quant", bits=4))(x)


def _model():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  params = jax.eval_shape(_Net().init, jax.random.PRNGKey(1), x)["params"]
  loss = lambda p, x: jnp.sum(_Net().apply({"params": p}, x) ** 2)
  return loss, params, x


def test_report_lists_every_layer_formula_equals_measured():
  loss, params, x = _model()
  report = lv.measure.memory_report(loss, params, x, compile=False)
  names = [r.name for r in report.layers]
  assert names == list(RULES) + ["head"]
  methods = [r.method for r in report.layers]
  assert methods == [r["method"] for r in RULES.values()] + ["quant"]
  for row in report.layers:
    assert row.formula_bytes == row.measured_bytes, row
  by_name = {r.name: r for r in report.layers}
  assert by_name["c_none"].formula_bytes == 4 * 4 * 8 * 8 * 3
  assert by_name["c_ckpt"].formula_bytes == by_name["c_ckpt"].activation_bytes
  assert by_name["c_gf"].formula_bytes == 4 * 4 * 4 * 4 * 6
  assert by_name["c_q4"].formula_bytes == 4 * math.ceil(4 * 64 * 6 / 8) + 8
  assert by_name["c_q8"].formula_bytes == 4 * 64 * 6 + 8 * 6
  assert report.xla is None and report.full_size == ()
  text = str(report)
  assert "c_gf" in text and "gradfilter" in text


class _BlockNet(nn.Module):
  """conv → BatchNorm → lv.relu, three times, and a head."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i in range(3):
      x = nn.Conv(6, (3, 3), use_bias=False, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
      x = lv.relu(x)
    return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))


def test_methods_through_per_layer_rules():
  model = _BlockNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  rules = [lvr.Rule("conv1", {"method": "gradfilter", "radius": 2}),
           lvr.Rule("conv2", {"method": "quant", "bits": 4}),
           lvr.Rule("head")]
  plan = lvr.plan(model, rules, x)
  trained, frozen = plan.split(variables)

  def loss(params, x):
    v = plan.merge({**trained, "params": params}, frozen)
    with plan.intercept():
      y, _ = model.apply(v, x, mutable=["compression", "batch_stats"])
    return jnp.sum(y ** 2)

  report = lv.measure.memory_report(loss, trained["params"], x,
                                    compile=False)
  assert [(r.name, r.method) for r in report.layers] == [
      ("conv1", "gradfilter"), ("conv2", "quant")]
  for row in report.layers:
    assert row.formula_bytes == row.measured_bytes
  assert set(trained["params"]) == {"conv1", "conv2", "head"}


def test_report_without_flax_names_layers_in_call_order():
  conv = lv.compressed_conv(method="quant", bits=8)
  dense = lv.compressed_dense(method="checkpoint")

  def loss(w, v, x):
    y = lv.relu(conv(x, w, (1, 1), "SAME", dimension_numbers=DN))
    y = lv.relu(conv(y, w, (1, 1), "SAME", dimension_numbers=DN))
    return jnp.sum(dense(y.mean((1, 2)), v, (((1,), (0,)), ((), ()))))

  args = (jnp.ones((3, 3, 4, 4)), jnp.ones((4, 2)), jnp.ones((2, 6, 6, 4)))
  report = lv.measure.memory_report(loss, *args)
  assert [r.name for r in report.layers] == ["conv_0", "conv_1", "dense_0"]
  assert report.xla is not None and report.xla.temp_bytes > 0
  assert "XLA" in str(report)
  assert [r.formula_bytes for r in report.layers] == [
      2 * 6 * 6 * 4 + 8, 2 * 6 * 6 * 4 + 8, 4 * 2 * 4]


def test_full_size_residual_of_a_neighbour_is_reported():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(2):
        x = nn.Conv(6, (3, 3), name=f"c{i}", conv_general_dilated_cls=(
            lvf.conv_cls(method="quant", bits=4)))(x)
        x = jax.nn.relu(x)
      return x

  x = jnp.ones((4, 8, 8, 6))
  params = jax.eval_shape(Net().init, jax.random.PRNGKey(0), x)["params"]
  loss = lambda p, x: jnp.sum(Net().apply({"params": p}, x))
  with pytest.warns(lv.measure.FullSizeResidualWarning, match="Net"):
    found = lv.measure.full_size_residuals(loss, params, x)
  # jax.nn.relu's residuals (its output, its rule's zeros), named by line.
  assert found and all("test_measure_report.py" in r.source for r in found)
  assert {r.shape for r in found} == {(4, 8, 8, 6)}


@pytest.mark.parametrize("neighbour", ["tanh", "train_bn", "silu"])
def test_other_neighbours_are_reported(neighbour):
  conv = lv.compressed_conv(method="gradfilter", radius=2)
  acts = {
      "tanh": jnp.tanh,
      "train_bn": lambda y: (y - y.mean((0, 1, 2))) * lax.rsqrt(
          y.var((0, 1, 2)) + 1e-5),
      "silu": jax.nn.silu,
  }

  def loss(w, x):
    for _ in range(2):
      x = acts[neighbour](conv(x, w, (1, 1), "SAME", dimension_numbers=DN))
    return jnp.sum(x)

  found = lv.measure.full_size_residuals(loss, jnp.ones((3, 3, 4, 4)),
                                         jnp.ones((2, 8, 8, 4)), warn=False)
  assert any(r.shape == (2, 8, 8, 4) for r in found), found


def test_clean_stack_has_no_full_size_residual():
  conv = lv.compressed_conv(method="quant", bits=4)
  stats = tuple(jnp.full((4,), v) for v in (0.0, 1.0, 1.0, 0.1))

  def loss(w, x):
    for _ in range(3):
      x = lv.silu(lv.frozen_batch_norm(conv(x, w, (1, 1), "SAME",
                                            dimension_numbers=DN), *stats))
    return jnp.sum(x)

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert lv.measure.full_size_residuals(
        loss, jnp.ones((3, 3, 4, 4)), jnp.ones((2, 8, 8, 4))) == ()


def test_layer_log_is_off_outside_recording():
  conv = lv.compressed_conv(method="none")
  with layer_log.recording() as log:
    conv(jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 2, 2)), (1, 1), "SAME",
         dimension_numbers=DN)
  conv(jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 2, 2)), (1, 1), "SAME",
       dimension_numbers=DN)
  assert len(log) == 1 and log[0].name == "conv_0"


# -------------------------------------------- XLA bytes per added block ---

SHAPE = (8, 16, 16, 8)   # one f32 activation = 64 KiB; kernels 2.25 KiB


@pytest.mark.parametrize("name", [
    "none", "hosvd(0.9)", "svd(0.9)", "gradfilter r2", "quant-8", "quant-4",
    "fused quant-4 (train BN)"])
def test_xla_temp_bytes_per_block_match_formula(name):
  """conv → BN → ReLU blocks: XLA's bytes per added block vs the formula.

  The stacks are those of experiments/memory_blocks.py (frozen BN and
  lv.relu, or the fused training-mode unit); the slope is fitted over
  depths 4, 8, 12 and 16, since XLA's buffer packing makes single steps
  uneven (HOSVD adds 2 KiB from depth 4 to 8 and 61 KiB from 8 to 12).
  Vanilla ("none") also keeps a flipped copy of each kernel (2.25 KiB
  here), which the formula does not count.
  """
  mb = _experiment()
  (_, build, formula), = [c for c in mb.cases(0.9) if c[0] == name]
  xla, jaxpr, _ = mb.per_block(build, SHAPE, (4, 8, 12, 16))
  expect = formula(SHAPE)
  # HOSVD keeps more per block than its residual at this tiny shape (8816
  # vs 7424 B; at 64x14x14x96, experiments/memory_stack.py measures 0.098
  # of the activation against the formula's 0.100, 2026-12-04). Its jaxpr
  # residual matches the formula;
  # where XLA's extra bytes sit was not traced at this shape. The absolute
  # temps are lower than before lv.relu used schedule.computed_once (222848
  # vs 227456 B at depth 4, 319616 vs 325760 at depth 16).
  high = 1.4 if name.startswith("hosvd") else 1.12
  assert 0.85 * expect <= xla <= high * expect, (xla, expect)
  assert abs(jaxpr - expect) <= 0.02 * expect + 64, (jaxpr, expect)
