"""The modules lowrank_vjp.nnx.apply plugs in: Contraction (stats, ASI
state), TrainedBatchNorm, FrozenBatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

import lowrank_vjp as lv
import lowrank_vjp.rules as lvr


class Net(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x, train=False):
    x = self.bn(self.conv(x), use_running_average=not train)
    return self.head(lv.relu(x).mean((1, 2)))


def _x(shape=(4, 8, 8, 3)):
  return jax.random.normal(jax.random.key(1), shape)


def _asi_model(x):
  model = Net(nnx.Rngs(0))
  lv.nnx.apply(model, [lvr.Rule("conv", {"method": "asi",
                                         "rank_fraction": 0.5}),
                       lvr.Rule("head")], x, train=True)
  return model


def _method_state(model):
  return model.conv.conv_general_dilated.method_state.get_value()


def test_asi_state_is_created_unstarted_and_advances_with_training_calls():
  x = _x()
  model = _asi_model(x)
  state = _method_state(model)
  assert not bool(state["started"])
  assert {k: v.shape for k, v in state["factors"].items()} == {
      "0": (4, 2), "1": (8, 4), "2": (8, 4), "3": (3, 2)}
  model(x, train=True)
  after = _method_state(model)
  assert bool(after["started"])
  assert not np.allclose(after["factors"]["1"], state["factors"]["1"])
  # model.eval() sets `deterministic`: the layer's own contraction runs, on
  # any batch, and the state is left as it is.
  model.eval()
  assert model.conv.conv_general_dilated.deterministic
  model(_x((2, 8, 8, 3)))
  np.testing.assert_array_equal(_method_state(model)["factors"]["1"],
                                after["factors"]["1"])


def test_asi_state_of_another_shape_is_an_error():
  model = _asi_model(_x())
  with pytest.raises(ValueError, match="holds arrays of shapes"):
    model(_x((2, 8, 8, 3)), train=True)


def test_asi_state_saves_and_restores_bit_for_bit_with_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  x = _x()
  model = _asi_model(x)
  model(x, train=True)
  state = nnx.state(model)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "state", state)
  other = _asi_model(x)   # unstarted, other statistics
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                    nnx.state(other))
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "state", abstract)
  nnx.update(other, restored)
  want = jax.tree_util.tree_leaves(state)
  got = jax.tree_util.tree_leaves(nnx.state(other))
  assert len(want) == len(got)
  for a, b in zip(want, got, strict=True):
    np.testing.assert_array_equal(a, b)
  assert bool(_method_state(other)["started"])
  np.testing.assert_array_equal(other(x, train=True), model(x, train=True))


def test_trained_batchnorm_keeps_codes_and_updates_its_statistics():
  x = _x()
  model = Net(nnx.Rngs(0))
  plan = lv.nnx.apply(model, [lvr.Rule("conv", "hosvd", train_bn=True),
                              lvr.Rule("head")], x, train=True)
  assert dict(plan.bn_methods)["bn"] == lv.methods.Quant(bits=8,
                                                        per_channel=True)
  graphdef, diff, rest = nnx.split(model, plan.wrt, ...)
  # The layers write their records: merge copies made at the traced level.
  saved = saved_residuals(lambda d: nnx.merge(
      graphdef, d, jax.tree_util.tree_map(jnp.asarray, rest))(
          x, train=True).sum(), diff)
  activation = 4 * 8 * 8 * 8   # the BatchNorm's input, float32
  # x̂ as 8-bit codes packed four to a uint32, beside small factors, sums
  # and ReLU's bits; autodiff would keep float32 x − mean (4 bytes each).
  assert any(a.dtype == jnp.uint32 and a.size == activation // 4
             for a, _ in saved)
  kept = sum(a.size * a.dtype.itemsize for a, d in saved
             if "from the argument" not in d)
  assert kept < 0.5 * 4 * activation
  model(x, train=True)
  assert not np.allclose(model.bn.mean[...], 0.0)
  assert lv.nnx.stats(model)["bn"].method.startswith("quant")


def test_frozen_batchnorm_uses_its_running_averages_when_the_model_trains():
  x = _x()
  model = Net(nnx.Rngs(0))
  lv.nnx.apply(model, [lvr.Rule("head")], x, train=True)
  y = model(x, train=True)
  np.testing.assert_array_equal(model.bn.mean[...], jnp.zeros(8))
  np.testing.assert_array_equal(y, model(x, train=False))


def test_trained_batchnorm_rejects_a_mask():
  x = _x()
  model = Net(nnx.Rngs(0))
  lv.nnx.apply(model, [lvr.Rule("conv", "hosvd", train_bn=True)], x,
               train=True)
  with pytest.raises(ValueError, match="mask is not supported"):
    model.bn(jnp.ones((2, 8)), False, mask=jnp.ones((2, 8), bool))


def test_a_layer_not_yet_called_has_no_stats():
  model = Net(nnx.Rngs(0))
  lv.nnx.apply(model, [lvr.Rule("conv", "svd")])   # no example input
  assert lv.nnx.stats(model) == {}
  model(_x(), train=True)
  assert list(lv.nnx.stats(model)) == ["conv"]
