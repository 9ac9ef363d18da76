"""Rules pick exactly the intended layers, on every model and a user's own."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf
import lowrank_vjp.rules as lvr
from lowrank_vjp import models

MiB = 2**20
HOSVD = {"method": "hosvd", "eps": 0.8, "on_overflow": "ignore"}

# The layers the papers fine-tune as "last 2" / "last 4", and the vanilla
# analytic activation memory they report for them (batch 64, 224×224,
# float32, MiB; docs/methods.md).
EXPECTED = {
    "mobilenet_v2": (
        ["features/17/conv/2", "features/18/0"],
        ["features/17/conv/0/0", "features/17/conv/1/0"], 15.31, 28.71),
    "resnet18": (
        ["layer4/1/conv1", "layer4/1/conv2"],
        ["layer4/0/conv1", "layer4/0/conv2"], 12.25, 30.63),
    "resnet34": (
        ["layer4/2/conv1", "layer4/2/conv2"],
        ["layer4/1/conv1", "layer4/1/conv2"], 12.25, 24.50),
    "mcunet": (
        ["blocks/13/mobile_inverted_conv/depth_conv/conv",
         "blocks/13/mobile_inverted_conv/point_linear/conv"],
        ["blocks/12/mobile_inverted_conv/point_linear/conv",
         "blocks/13/mobile_inverted_conv/inverted_bottleneck/conv"],
        13.78, 19.52),
}


@pytest.fixture(scope="module")
def paper_layers():
  x = jax.ShapeDtypeStruct((64, 224, 224, 3), jnp.float32)
  return {name: lvr.discover(models.get_spec(name).build(), x)
          for name in EXPECTED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_last_k_is_what_the_papers_fine_tune(name, paper_layers):
  spec = models.get_spec(name)
  layers = paper_layers[name]
  last2, before, mib2, mib4 = EXPECTED[name]
  assert list(lvr.last_k(layers, 2, exclude=spec.exclude)) == last2
  assert list(lvr.last_k(layers, 4, exclude=spec.exclude)) == before + last2
  for k, mib in ((2, mib2), (4, mib4)):
    rules = lvr.fine_tune_last(layers, k, HOSVD, exclude=spec.exclude,
                               head=spec.head)
    plan = lvr.make_plan(layers, rules)
    assert list(plan.compressed_paths) == (before + last2)[-k:]
    assert list(plan.trainable) == (before + last2)[-k:] + [spec.head]
    assert plan.train_bn == ()
    vanilla = sum(plan.layer(p).input_nbytes for p in plan.compressed_paths)
    assert vanilla / MiB == pytest.approx(mib, abs=0.006)


def test_resnet_downsample_stays_frozen(paper_layers):
  layers = paper_layers["resnet18"]
  spec = models.get_spec("resnet18")
  plan = lvr.make_plan(layers, lvr.fine_tune_last(
      layers, 4, HOSVD, exclude=spec.exclude, head=spec.head, train_bn=True))
  assert "layer4/0/downsample/0" not in plan.trainable
  assert plan.train_bn == ("layer4/0/bn1", "layer4/0/bn2", "layer4/1/bn1",
                           "layer4/1/bn2")
  assert "layer4/0/downsample/1" not in plan.train_bn


def test_regex_rules_first_match_wins(paper_layers):
  layers = paper_layers["mobilenet_v2"]
  rules = [lvr.Rule(r"features/17/conv/1/0", None),
           lvr.Rule(r"features/1[78]/.*", HOSVD, train_bn=True),
           lvr.Rule("classifier/1")]
  plan = lvr.make_plan(layers, rules)
  assert plan.trainable == (
      "features/17/conv/0/0", "features/17/conv/0/1", "features/17/conv/1/0",
      "features/17/conv/1/1", "features/17/conv/2", "features/17/conv/3",
      "features/18/0",
      "features/18/1", "classifier/1")
  assert plan.compressed_paths == ("features/17/conv/0/0",
                                   "features/17/conv/2", "features/18/0")
  # BatchNorms matched by the train_bn rule are trained, including the one
  # after the uncompressed depthwise conv (its path matches that rule too).
  assert plan.train_bn == ("features/17/conv/0/1", "features/17/conv/1/1",
                           "features/17/conv/3", "features/18/1")


def test_bad_rules_are_errors(paper_layers):
  layers = paper_layers["mobilenet_v2"]
  with pytest.raises(ValueError, match="matches no layer"):
    lvr.make_plan(layers, [lvr.Rule(r"feature/17/.*", HOSVD)])
  with pytest.raises(ValueError, match="no nn.Conv"):
    lvr.make_plan(layers, [lvr.Rule(r"features/17/conv/3", HOSVD)])
  with pytest.raises(ValueError, match="not a regex"):
    lvr.Rule("features/(", HOSVD)
  with pytest.raises(ValueError, match="has 52"):
    lvr.last_k(layers, 53)


def test_settings_are_resolved_into_a_method_when_the_rule_is_made():
  """Any registered method works by name; what it does not take is refused.

  (A user's own method needs no edit either: tests/methods/
  test_methods_base.py puts one through a rule.)
  """
  rule = lvr.Rule("a", {"method": "hosvd", "eps": 0.8, "ranks": [1, 2]})
  assert rule.method == lv.methods.Hosvd(eps=0.8, ranks=(1, 2))
  assert lvr.Rule("a", {"method": "gradfilter", "radius": 4}).method == (
      lv.methods.GradFilter(radius=4))
  assert lvr.Rule("a", lv.methods.Quant(bits=4)).method == lv.methods.Quant(
      bits=4)
  assert lvr.Rule("a", "svd").method == lv.methods.Svd()
  hash(rule)
  with pytest.raises(TypeError, match="ranks"):
    lvr.Rule("a", {"method": "gradfilter", "radius": 2, "ranks": [1, 2]})


# ------------------------------------------------------- a user's model ---


class UserNet(nn.Module):
  """A model written without lowrank_vjp in mind."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    for i in range(3):
      y = nn.Conv(8, (3, 3), use_bias=False, name=f"body_{i}")(x)
      y = nn.BatchNorm(use_running_average=not train, name=f"norm_{i}")(y)
      x = x + lv.relu(y)
    return nn.Dense(3, name="out")(x.mean((1, 2)))


@pytest.fixture(scope="module")
def user():
  model = UserNet()
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  variables["batch_stats"] = jax.tree_util.tree_map(
      lambda v: v + 0.3, variables["batch_stats"])  # non-trivial statistics
  return model, variables, x


def test_user_model_forward_is_unchanged_and_stats_sown(user):
  model, variables, x = user
  plan = lvr.plan(model, [lvr.Rule(r"body_[12]", HOSVD), lvr.Rule("out")], x,
                  variables=variables)
  assert plan.compressed_paths == ("body_1", "body_2")
  assert plan.trainable == ("body_1", "body_2", "out")
  # Jitted (op by op, the HOSVDs compiled every operation on its own).
  reference = jax.jit(model.apply)(variables, x)

  @jax.jit
  def intercepted(variables, x):
    with plan.intercept():
      return model.apply(variables, x, mutable=["compression"])

  y, state = intercepted(variables, x)
  np.testing.assert_allclose(y, reference, rtol=1e-6, atol=1e-6)
  assert sorted(lvf.collect_stats(state)) == ["body_1", "body_2"]
  # No parameter was added, none dropped: same variables tree.
  assert "compression" not in variables


def test_user_model_gradients(user):
  """At ε = 1 the compressed layers give vanilla's gradients; only the
  trained parameters are differentiated; frozen BatchNorm stays frozen."""
  model, variables, x = user
  exact = {"method": "hosvd", "eps": 1.0}
  plan = lvr.plan(model, [lvr.Rule(r"body_.*", exact), lvr.Rule("out")], x,
                  variables=variables, train=True)
  trained, frozen = plan.split(variables)
  assert set(trained) == {"params"}
  assert "stem" in frozen["params"] and "norm_0" in frozen["params"]
  labels = jnp.array([0, 1, 2, 1])

  def loss(params, intercept):
    v = plan.merge({"params": params}, frozen)
    if intercept:
      with plan.intercept():
        logits, _ = model.apply(v, x, train=True,
                                mutable=["compression", "batch_stats"])
    else:
      logits = model.apply(v, x, train=False)  # eval-mode BN = frozen BN
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           labels).mean()

  grad = jax.jit(jax.grad(loss), static_argnums=1)  # op by op: seconds
  g = grad(trained["params"], True)
  g_ref = grad(trained["params"], False)
  assert sorted(g) == ["body_0", "body_1", "body_2", "out"]
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(
      g_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_user_model_asi(user):
  """Rules with ``method="asi"``: the layers keep their factors in the
  ``"asi_state"`` collection, stats are keyed by the nn.Conv paths, and at
  full ranks the gradients are vanilla's, cold and warm."""
  model, variables, x = user
  asi = {"method": "asi", "rank_fraction": 1.0}
  plan = lvr.plan(model, [lvr.Rule(r"body_[12]", asi), lvr.Rule("out")], x,
                  variables=variables)
  assert plan.compressed_paths == ("body_1", "body_2")
  assert plan.trainable == ("body_1", "body_2", "out")  # adapters unlisted
  trained, frozen = plan.split(variables)
  with plan.intercept():
    asi_state = jax.jit(lambda v: model.apply(
        v, x, mutable=["asi_state"])[1]["asi_state"])(variables)
  assert sorted(asi_state) == ["body_1", "body_2"]

  def loss(params, asi_state):
    v = plan.merge({"params": params}, frozen)
    v["asi_state"] = asi_state
    with plan.intercept():
      logits, state = model.apply(v, x, mutable=["asi_state", "compression"])
    return logits.sum(), state

  def loss_ref(params):
    return model.apply(plan.merge({"params": params}, frozen), x).sum()

  g_ref = jax.jit(jax.grad(loss_ref))(trained["params"])
  step = jax.jit(jax.grad(loss, has_aux=True))
  for started in (False, True):
    leaves = jax.tree_util.tree_leaves_with_path(asi_state)
    assert all(bool(v) == started for p, v in leaves
               if "started" in jax.tree_util.keystr(p))
    g, state = step(trained["params"], asi_state)
    asi_state = state["asi_state"]
    assert sorted(lvf.collect_stats(state)) == ["body_1", "body_2"]
    for a, b in zip(jax.tree_util.tree_leaves(g),
                    jax.tree_util.tree_leaves(g_ref), strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_train_bn_option(user):
  model, variables, x = user
  plan = lvr.plan(model, [lvr.Rule("body_2", HOSVD, train_bn=True),
                          lvr.Rule("out")], x, variables=variables,
                  train=True)
  assert plan.train_bn == ("norm_2",)
  assert plan.trainable == ("body_2", "norm_2", "out")
  trained, frozen = plan.split(variables)
  assert list(trained["batch_stats"]) == ["norm_2"]
  with plan.intercept():
    _, state = model.apply(variables, x, train=True,
                           mutable=["batch_stats", "compression"])
  stats = state["batch_stats"]
  for name in ("norm_0", "norm_1"):  # frozen: running averages untouched
    np.testing.assert_array_equal(stats[name]["mean"],
                                  variables["batch_stats"][name]["mean"])
  assert not np.allclose(stats["norm_2"]["mean"],
                         variables["batch_stats"]["norm_2"]["mean"])
  merged = plan.merge(trained, frozen)
  for a, b in zip(jax.tree_util.tree_leaves(merged),
                  jax.tree_util.tree_leaves(variables), strict=True):
    np.testing.assert_array_equal(a, b)


def test_frozen_part_keeps_no_residuals():
  """What the backward pass keeps grows with the trained layers' inputs
  only: the frozen MobileNetV2 below them is not differentiated."""
  model = models.MobileNetV2(num_classes=10)

  def residual_bytes(size, k):
    x = jax.ShapeDtypeStruct((4, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    layers = lvr.discover(model, x, variables=variables, train=True)
    plan = lvr.make_plan(layers, lvr.fine_tune_last(
        layers, k, {"method": "none"}, head="classifier/1"))
    trained, frozen = plan.split(variables)

    def loss(params, frozen, x):
      v = plan.merge({"params": params}, frozen)
      with plan.intercept():
        logits, _ = model.apply(v, x, train=True,
                                rngs={"dropout": jax.random.key(0)},
                                mutable=["compression", "batch_stats"])
      return jnp.sum(logits)

    closure = jax.eval_shape(
        lambda p, f, x: jax.vjp(lambda p: loss(p, f, x), p)[1],
        trained["params"], frozen, x)
    held = sum(leaf.size * leaf.dtype.itemsize
               for leaf in jax.tree_util.tree_leaves(closure))
    inputs = sum(plan.layer(p).input_nbytes for p in plan.compressed_paths)
    return held, inputs

  held32, in32 = residual_bytes(32, 4)
  held64, in64 = residual_bytes(64, 4)
  # 4x the pixels: the residuals grow by the trained inputs' growth (plus
  # 1-bit masks), not by the frozen network's activations (megabytes).
  assert held64 - held32 <= 1.1 * (in64 - in32) + 16_384
  full32, _ = residual_bytes(32, 52)
  full64, _ = residual_bytes(32 * 2, 52)
  assert full64 - full32 > 20 * (held64 - held32)


class _RootParams(nn.Module):
  """A model owning a parameter itself, beside a dense layer."""

  @nn.compact
  def __call__(self, x):
    offset = self.param("offset", nn.initializers.ones, (x.shape[-1],))
    return nn.Dense(3, name="dense")(x + offset)


def test_the_root_is_a_layer_only_when_it_owns_parameters():
  x = jnp.ones((2, 4))
  layers = lvr.discover(_RootParams(), x)
  assert [(layer.path, layer.params) for layer in layers] == [
      ("", ("offset",)), ("dense", ("bias", "kernel"))]
  variables = _RootParams().init(jax.random.key(0), x)
  trained, frozen = lvr.make_plan(layers, [lvr.Rule(".*")]).split(variables)
  assert set(trained["params"]) == {"offset", "dense"} and not frozen
  # A rule for the dense layer alone leaves the root's parameter frozen.
  trained, frozen = lvr.make_plan(layers, [lvr.Rule("dense")]).split(
      variables)
  assert set(frozen["params"]) == {"offset"}
  # Models without parameters of their own have no root layer.
  paths = [layer.path for layer in lvr.discover(nn.Sequential([nn.Dense(2)]),
                                                 x)]
  assert paths == ["layers_0"]
