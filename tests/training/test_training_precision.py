"""lowrank_vjp.training.precision and the mixed-precision train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_vjp import training
from lowrank_vjp.training import precision


def test_only_float16_scales_its_loss():
  assert precision.init_loss_scale(None) == {}
  assert precision.init_loss_scale(jnp.bfloat16) == {}
  ls = precision.init_loss_scale(jnp.float16)
  assert float(ls["scale"]) == precision.INITIAL_SCALE
  assert int(ls["good_steps"]) == 0
  assert precision.compute_dtype("float32") is None
  assert precision.compute_dtype("bfloat16") == jnp.bfloat16
  with pytest.raises(ValueError, match="dtype must be one of.*'int8'"):
    precision.compute_dtype("int8")


def test_the_scale_halves_on_overflow_and_doubles_after_a_period():
  ls = precision.init_loss_scale(jnp.float16)
  grads = {"a": jnp.ones(3), "b": jnp.asarray([1.0, jnp.inf])}
  unscaled, finite = precision.unscale(grads, ls)
  assert not bool(finite)
  np.testing.assert_allclose(unscaled["a"], 1 / precision.INITIAL_SCALE)
  halved = precision.next_loss_scale(ls, finite)
  assert float(halved["scale"]) == precision.INITIAL_SCALE / 2
  assert int(halved["good_steps"]) == 0
  nan = precision.unscale({"a": jnp.asarray([jnp.nan])}, ls)[1]
  assert not bool(nan)
  ok = precision.unscale({"a": jnp.ones(3)}, ls)[1]
  assert bool(ok)
  almost = {"scale": ls["scale"],
            "good_steps": jnp.asarray(precision.PERIOD - 2, jnp.int32)}
  one_more = precision.next_loss_scale(almost, ok)
  assert float(one_more["scale"]) == precision.INITIAL_SCALE
  assert int(one_more["good_steps"]) == precision.PERIOD - 1
  grown = precision.next_loss_scale(one_more, ok)
  assert float(grown["scale"]) == 2 * precision.INITIAL_SCALE
  assert int(grown["good_steps"]) == 0
  floor = {"scale": jnp.asarray(precision.MIN_SCALE, jnp.float32),
           "good_steps": jnp.zeros((), jnp.int32)}
  assert float(precision.next_loss_scale(floor, nan)["scale"]) == (
      precision.MIN_SCALE)
  # Not scaling: the loss and the gradients pass through.
  assert precision.scale_loss(jnp.asarray(2.0), {}) == 2.0
  same, finite = precision.unscale({"a": jnp.asarray([jnp.inf])}, {})
  assert bool(finite) and same["a"][0] == jnp.inf


def _step(tiny, name, dtype, train_bn=False):
  from lowrank_vjp import rules as lvr  # pylint: disable=g-import-not-at-top
  settings = training.method_settings(name, eps=0.9)
  plan = lvr.make_plan(tiny.layers, lvr.fine_tune_last(
      tiny.layers, 2, settings, head="head", train_bn=train_bn))
  trained, frozen = plan.split(tiny.variables)
  tx = optax.sgd(0.1)
  state = training.initial_state(trained, tx, dtype=dtype)
  # HOSVD: a rank controller redoes a step that needed more than the
  # capacity, so the step that runs keeps ε.
  controller = training.make_controller(plan, patience=1, headroom=1.0)
  step = training.make_train_step(
      tiny.model, plan, tx, seed=0, image_size=None, donate=False,
      dtype=dtype, redo_on_overflow=controller is not None)
  new, metrics = training.run_step(step, controller, state, frozen, tiny.x,
                                   tiny.labels)
  update = jax.tree.map(lambda a, b: np.asarray(a - b, np.float64),
                        new["params"], state["params"])
  return state, new, metrics, update


def _flat(tree):
  return np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["vanilla", "hosvd"])
def test_a_mixed_precision_step_matches_float32(tiny, name, dtype):
  _, ref, ref_m, ref_update = _step(tiny, name, None, train_bn=True)
  state, new, m, update = _step(tiny, name, dtype, train_bn=True)
  # What is stored stays float32: parameters, BN running averages, the
  # optimizer state.
  for tree in (new["params"], new["batch_stats"], new["opt_state"]):
    for leaf in jax.tree.leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
  assert jax.tree.structure(new) == jax.tree.structure(state)
  # The compressed layers saw activations of the compute dtype.
  for s in m["stats"].values():
    assert s.itemsize == 2
  for s in ref_m["stats"].values():
    assert s.itemsize == 4
  # Stated tolerances: the loss within 1 %, the update within 5 % in norm
  # and direction (8 mantissa bits for bfloat16, 11 for float16).
  np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]),
                             rtol=1e-2)
  a, b = _flat(update), _flat(ref_update)
  assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b)
  for path in ref["batch_stats"]:
    for k in ("mean", "var"):
      np.testing.assert_allclose(new["batch_stats"][path][k],
                                 ref["batch_stats"][path][k],
                                 rtol=2e-2, atol=2e-3)
  if name == "hosvd":  # the ε guarantee holds in the narrow dtype too
    for s in m["stats"].values():
      assert not s.overflow
      assert np.all(np.asarray(s.kept_energy) >= 0.9 - 1e-6)
  if dtype == "float16":
    assert float(m["loss_scale"]) == precision.INITIAL_SCALE
    assert not bool(m["skipped"])
    assert int(new["loss_scale"]["good_steps"]) == 1
  else:
    assert "loss_scale" not in new and "skipped" not in m


def test_float16_skips_a_step_whose_gradients_overflow(tiny):
  from lowrank_vjp import rules as lvr  # pylint: disable=g-import-not-at-top
  plan = lvr.make_plan(tiny.layers, lvr.fine_tune_last(
      tiny.layers, 1, training.method_settings("vanilla"), head="head"))
  trained, frozen = plan.split(tiny.variables)
  tx = optax.sgd(0.1, momentum=0.9)
  state = training.initial_state(trained, tx, dtype="float16")
  # A scale at which the float16 backward overflows.
  state["loss_scale"] = {"scale": jnp.asarray(6e4, jnp.float32),
                         "good_steps": jnp.asarray(7, jnp.int32)}
  step = training.make_train_step(tiny.model, plan, tx, 0, None,
                                  donate=False, dtype="float16")
  new, m = step(state, frozen, tiny.x * 1e3, tiny.labels)
  assert bool(m["skipped"])
  assert int(new["step"]) == 1
  assert float(new["loss_scale"]["scale"]) == 3e4
  assert int(new["loss_scale"]["good_steps"]) == 0
  for a, b in zip(jax.tree.leaves(new["params"]),
                  jax.tree.leaves(state["params"]), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(new["opt_state"]),
                  jax.tree.leaves(state["opt_state"]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_float16_step_needs_its_loss_scale(tiny):
  plan = tiny.plan(training.method_settings("vanilla"))
  trained, frozen = plan.split(tiny.variables)
  tx = optax.sgd(0.1)
  step = training.make_train_step(tiny.model, plan, tx, 0, None,
                                  donate=False, dtype="float16")
  with pytest.raises(ValueError, match="loss_scale"):
    step(training.initial_state(trained, tx), frozen, tiny.x, tiny.labels)


def test_the_eval_step_computes_in_the_dtype(tiny):
  seen = []
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  def spy(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Conv):
      seen.append(out.dtype)
    return out

  step = training.make_eval_step(tiny.model, None, jnp.bfloat16)
  with nn.intercept_methods(spy):
    correct, loss, count = step(tiny.variables, tiny.x, tiny.labels,
                                jnp.ones(4, bool))
  assert seen and all(d == jnp.bfloat16 for d in seen)
  assert loss.dtype == jnp.float32 and int(count) == 4
