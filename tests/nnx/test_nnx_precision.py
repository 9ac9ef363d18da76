"""lowrank_vjp.nnx.set_compute_dtype and the NNX job's mixed-precision step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_vjp as lv
import lowrank_vjp.rules as lvr
from lowrank_vjp.training import nnx_step, precision


class Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 4, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x, train=False):
    x = lv.relu(self.bn(self.conv(x), use_running_average=not train))
    return self.head(x.mean((1, 2)))


def _data():
  return (jax.random.normal(jax.random.key(1), (4, 8, 8, 3)),
          jnp.array([0, 1, 2, 3]))


def test_layers_left_unset_compute_in_the_dtype():
  model = Net(nnx.Rngs(0))
  assert lv.nnx.set_compute_dtype(model, "float32") == []
  assert sorted(lv.nnx.set_compute_dtype(model, jnp.bfloat16)) == [
      "bn", "conv"]
  assert model.head.dtype == jnp.float32  # set on purpose: kept
  x, _ = _data()
  h = model.bn(model.conv(x))
  assert h.dtype == jnp.bfloat16
  assert model(x, train=True).dtype == jnp.float32
  for leaf in jax.tree.leaves(nnx.state(model)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  with pytest.raises(ValueError, match="dtype must be one of"):
    lv.nnx.set_compute_dtype(model, "int8")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_nnx_step_trains_in_mixed_precision_as_float32(dtype):
  x, y = _data()
  runs = {}
  for d in (None, dtype):
    model = Net(nnx.Rngs(0))
    lv.nnx.set_compute_dtype(model, d)
    plan = lv.nnx.apply(model, [lvr.Rule("conv|head", {"method": "hosvd",
                                                       "eps": 1.0})], x,
                        train=True)
    job = nnx_step.NnxTraining.create(model, plan, optax.sgd(0.1), d)
    step = job.make_train_step(0, None, donate=False)
    new, m = step(job.state, job.frozen, x, y)
    runs[d] = (job.state, new, m)
  state, new, m = runs[dtype]
  ref_state, ref_new, ref_m = runs[None]
  assert jax.tree.structure(new) == jax.tree.structure(state)
  for leaf in jax.tree.leaves(new["model"]):
    assert leaf.dtype == jnp.float32
  assert m["stats"]["conv"].itemsize == 2
  np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]),
                             rtol=1e-2)
  delta = lambda a, b: np.concatenate([np.ravel(u - v) for u, v in zip(
      jax.tree.leaves(a["model"]), jax.tree.leaves(b["model"]), strict=True)])
  d, r = delta(new, state), delta(ref_new, ref_state)
  assert np.linalg.norm(d - r) <= 0.05 * np.linalg.norm(r)
  if dtype == "float16":
    assert float(m["loss_scale"]) == precision.INITIAL_SCALE
    assert not bool(m["skipped"])
    assert int(new["loss_scale"]["good_steps"]) == 1
  else:
    assert "loss_scale" not in new
