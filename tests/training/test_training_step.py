"""lowrank_vjp.training.step: the jitted train step and its state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_vjp import training


@pytest.mark.parametrize("name", ["vanilla", "hosvd", "asi"])
def test_a_step_trains_only_the_plan(tiny, name):
  settings = training.method_settings(name, eps=0.9)
  plan = tiny.plan(settings)
  assert training.uses_asi(plan) is (name == "asi")
  trained, frozen = plan.split(tiny.variables)
  trained = jax.tree.map(jnp.copy, trained)
  tx = optax.sgd(0.1)
  state = training.initial_state(trained, tx, training.init_asi_state(
      tiny.model, plan, tiny.variables, tiny.x))
  assert int(state["step"]) == 0 and bool(state["asi_state"]) is (
      name == "asi")
  step = training.make_train_step(tiny.model, plan, tx, seed=0,
                                  image_size=None)
  before = jax.tree.map(np.asarray, plan.split(tiny.variables)[0]["params"])
  new, metrics = step(state, frozen, tiny.x, tiny.labels)
  # The state was donated.
  assert all(leaf.is_deleted() for leaf in
             jax.tree_util.tree_leaves(state["params"]))
  assert int(new["step"]) == 1
  assert set(metrics) == {"loss", "accuracy", "stats", "overflow"}
  assert np.isfinite(float(metrics["loss"]))
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0
  assert set(metrics["stats"]) == set(plan.compressed_paths) == {"conv2"}
  assert set(new["params"]) == {"conv2", "head"}
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before,
                         jax.tree.map(np.asarray, new["params"]))
  assert any(jax.tree_util.tree_leaves(changed))
  variables = training.final_variables(plan, new, frozen)
  np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],
                                tiny.variables["params"]["conv1"]["kernel"])


def test_asi_without_its_state_is_an_error(tiny):
  plan = tiny.plan(training.method_settings("asi"))
  trained, frozen = plan.split(tiny.variables)
  tx = optax.sgd(0.1)
  step = training.make_train_step(tiny.model, plan, tx, 0, None,
                                  donate=False)
  with pytest.raises(ValueError, match="asi_state"):
    step(training.initial_state(trained, tx), frozen, tiny.x, tiny.labels)


def test_the_batch_statistics_of_trained_batchnorms_move(tiny):
  from lowrank_vjp import rules as lvr  # pylint: disable=g-import-not-at-top
  plan = lvr.make_plan(tiny.layers, lvr.fine_tune_last(
      tiny.layers, 2, {"method": "none"}, head="head", train_bn=True))
  assert plan.train_bn == ("bn1",)
  trained, frozen = plan.split(tiny.variables)
  tx = optax.sgd(0.1)
  state = training.initial_state(trained, tx)
  step = training.make_train_step(tiny.model, plan, tx, 0, None,
                                  donate=False)
  new, _ = step(state, frozen, tiny.x, tiny.labels)
  assert not np.allclose(new["batch_stats"]["bn1"]["mean"],
                         state["batch_stats"]["bn1"]["mean"])


def test_images_are_preprocessed(tiny):
  plan = tiny.plan(training.method_settings("vanilla"))
  trained, frozen = plan.split(tiny.variables)
  tx = optax.sgd(0.1)
  step = training.make_train_step(tiny.model, plan, tx, 0, image_size=6,
                                  donate=False)
  images = np.random.default_rng(0).integers(0, 256, (4, 9, 9, 1),
                                             dtype=np.uint8)
  new, metrics = step(training.initial_state(trained, tx), frozen, images,
                      tiny.labels)
  assert np.isfinite(float(metrics["loss"])) and int(new["step"]) == 1
