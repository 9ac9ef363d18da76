"""lowrank_vjp.nnx.apply / discover / stats / restore on small NNX models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

import lowrank_vjp as lv
import lowrank_vjp.rules as lvr

X_SHAPE = (4, 8, 8, 3)


class Net(nnx.Module):
  """conv1 → bn1 → relu → conv2 → bn2 → relu → mean → head; names sort
  apart from the call order ("bn1" < "conv1")."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x, train=False):
    x = lv.relu(self.bn1(self.conv1(x), use_running_average=not train))
    x = lv.relu(self.bn2(self.conv2(x), use_running_average=not train))
    return self.head(x.mean((1, 2)))


def _data():
  x = jax.random.normal(jax.random.key(1), X_SHAPE)
  return x, jnp.array([0, 1, 2, 3])


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      model(x, train=True), y).mean()


def test_discover_orders_layers_by_call_with_an_input_and_by_path_without():
  model = Net(nnx.Rngs(0))
  x, _ = _data()
  called = lv.nnx.discover(model, x, train=True)
  assert [layer.path for layer in called] == ["conv1", "bn1", "conv2",
                                              "bn2", "head"]
  assert [layer.kind for layer in called] == ["conv", "batch_norm", "conv",
                                              "batch_norm", "dense"]
  assert called[2].input_shape == (4, 8, 8, 8)
  assert called[0].params == ("bias", "kernel")
  by_path = lv.nnx.discover(model)
  assert [layer.path for layer in by_path] == ["bn1", "bn2", "conv1", "conv2",
                                       "head"]
  assert all(layer.input_shape is None for layer in by_path)
  # The abstract call left the model untouched.
  np.testing.assert_array_equal(model.bn1.mean[...], jnp.zeros(8))


def test_rules_pick_exactly_the_intended_layers():
  model = Net(nnx.Rngs(0))
  x, _ = _data()
  plan = lv.nnx.apply(model, [lvr.Rule("conv2", {"method": "hosvd",
                                                 "eps": 0.9}, train_bn=True),
                              lvr.Rule("head")], x, train=True)
  assert plan.compressed_paths == ("conv2",)
  assert plan.trainable == ("conv2", "bn2", "head")
  assert plan.train_bn == ("bn2",)
  assert isinstance(model.conv2.conv_general_dilated, lv.nnx.Contraction)
  assert model.conv2.conv_general_dilated.path == "conv2"
  assert model.conv1.conv_general_dilated is jax.lax.conv_general_dilated
  assert model.head.dot_general is jax.lax.dot_general
  assert type(model.bn1) is lv.nnx.FrozenBatchNorm
  assert type(model.bn2) is lv.nnx.TrainedBatchNorm
  assert sorted(lv.nnx.stats(model)) == ["bn2", "conv2"]
  # The filter selects the trained parameters only.
  trained = nnx.state(model, plan.wrt)
  assert sorted("/".join(map(str, p))
                for p, _ in nnx.to_flat_state(trained)) == [
                    "bn2/bias", "bn2/scale", "conv2/bias", "conv2/kernel",
                    "head/bias", "head/kernel"]


def test_a_rule_that_matches_nothing_is_an_error():
  model = Net(nnx.Rngs(0))
  with pytest.raises(ValueError, match="'conv9' matches no layer"):
    lv.nnx.apply(model, [lvr.Rule("conv9", "hosvd")])
  with pytest.raises(ValueError, match="matches no nn.Conv or nn.Dense"):
    lv.nnx.apply(model, [lvr.Rule("bn1", "hosvd")])
  # A failed apply changed nothing.
  assert model.conv1.conv_general_dilated is jax.lax.conv_general_dilated
  assert type(model.bn1) is nnx.BatchNorm


def test_apply_again_replans_and_restore_undoes():
  model = Net(nnx.Rngs(0))
  x, _ = _data()
  before = jax.tree_util.tree_structure(nnx.state(model))
  ref = model(x)
  lv.nnx.apply(model, [lvr.Rule("conv[12]", "hosvd")], x)
  lv.nnx.apply(model, [lvr.Rule("head", "svd")], x)
  assert model.conv1.conv_general_dilated is jax.lax.conv_general_dilated
  assert type(model.bn1) is lv.nnx.FrozenBatchNorm
  assert isinstance(model.head.dot_general, lv.nnx.Contraction)
  assert list(lv.nnx.stats(model)) == ["head"]
  lv.nnx.restore(model)
  assert type(model.bn1) is nnx.BatchNorm
  assert model.head.dot_general is jax.lax.dot_general
  assert not lv.nnx.stats(model)
  assert jax.tree_util.tree_structure(nnx.state(model)) == before
  np.testing.assert_array_equal(model(x), ref)


def test_eps1_training_step_equals_the_uncompressed_one():
  x, y = _data()
  ours, theirs = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  plan = lv.nnx.apply(ours, [
      lvr.Rule("conv[12]", {"method": "hosvd", "eps": 1.0}, train_bn=True,
               bn_method=None),
      lvr.Rule("head", {"method": "svd", "eps": 1.0})], x, train=True)
  assert plan.compressed_paths == ("conv1", "conv2", "head")
  g_ours = nnx.grad(_loss, argnums=nnx.DiffState(0, plan.wrt))(ours, x, y)
  g_theirs = nnx.grad(_loss)(theirs, x, y)
  flat = dict(nnx.to_flat_state(g_theirs))
  got = dict(nnx.to_flat_state(g_ours))
  assert set(got) == set(flat)
  for path, value in got.items():
    np.testing.assert_allclose(value[...], flat[path][...], rtol=2e-5,
                               atol=2e-6, err_msg=str(path))
  for bn in ("bn1", "bn2"):  # the same running statistics
    np.testing.assert_allclose(getattr(ours, bn).mean[...],
                               getattr(theirs, bn).mean[...], rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(getattr(ours, bn).var[...],
                               getattr(theirs, bn).var[...], rtol=1e-6,
                               atol=1e-7)


def test_the_frozen_part_keeps_no_residuals():
  x, y = _data()
  model = Net(nnx.Rngs(0))
  plan = lv.nnx.apply(model, [lvr.Rule("head")], x, train=True)

  def residuals(wrt):
    graphdef, diff, rest = nnx.split(model, wrt, ...)
    saved = saved_residuals(
        lambda d: _loss(nnx.merge(graphdef, d, rest), x, y), diff)
    return [a for a, _ in saved
            if a.shape == (4, 8, 8, 8) and a.dtype == jnp.float32]

  assert not residuals(plan.wrt)
  # Differentiating every parameter keeps them (the check can fail).
  assert residuals(nnx.Param)


def test_stats_reach_the_rank_controller_and_capacities_reach_the_layers():
  x, y = _data()
  model = Net(nnx.Rngs(0))
  plan = lv.nnx.apply(model, [lvr.Rule("conv2", {"method": "hosvd",
                                                 "eps": 0.9}),
                              lvr.Rule("head")], x, train=True)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=plan.wrt)
  controller = lv.RankController(patience=1)

  @nnx.jit(static_argnames="capacities")
  def step(model, optimizer, capacities=None):
    with lv.rank_capacities(capacities):
      _, grads = nnx.value_and_grad(
          _loss, argnums=nnx.DiffState(0, plan.wrt))(model, x, y)
    optimizer.update(model, grads)
    return lv.nnx.stats(model)

  stats = jax.device_get(step(model, optimizer))
  assert list(stats) == ["conv2"]
  assert stats["conv2"].capacity == (2, 4, 4, 4)   # rank_fraction 0.5
  controller.observe(stats)
  key = controller.key()
  assert dict(key)["conv2"] != stats["conv2"].capacity
  stats = jax.device_get(step(model, optimizer, capacities=key))
  assert stats["conv2"].capacity == tuple(dict(key)["conv2"])
  assert not bool(stats["conv2"].overflow)
  assert np.all(np.asarray(stats["conv2"].kept_energy) >= 0.9 - 1e-6)
