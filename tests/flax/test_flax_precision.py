"""lowrank_vjp.flax.compute_dtype: mixed precision for any Linen model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp.flax as lvf


class Net(nn.Module):
  """conv → BN → relu → dense, and a head kept in float32 on purpose."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.relu(x).mean((1, 2))
    x = nn.Dense(4, name="dense")(x)
    return nn.Dense(3, dtype=jnp.float32, name="head")(x)


def _outputs(dtype, x):
  model = Net()
  variables = model.init(jax.random.key(0), x)
  seen = {}

  def spy(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    seen[context.module.name] = out.dtype
    return out

  with nn.intercept_methods(spy), lvf.compute_dtype(dtype):
    y, state = model.apply(variables, x.astype(dtype or jnp.float32),
                           train=True, mutable=["batch_stats"])
  return variables, y, state, seen


def test_every_layer_computes_in_the_dtype_but_one_that_sets_its_own():
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
  variables, y, state, seen = _outputs(jnp.bfloat16, x)
  assert seen["conv"] == seen["bn"] == seen["dense"] == jnp.bfloat16
  assert seen["head"] == y.dtype == jnp.float32
  # Parameters and running averages stay float32.
  for leaf in jax.tree.leaves((variables, state)):
    assert leaf.dtype == jnp.float32
  # The running averages are reduced in float32: close to float32's own.
  _, y32, state32, _ = _outputs(None, x)
  np.testing.assert_allclose(state["batch_stats"]["bn"]["mean"],
                             state32["batch_stats"]["bn"]["mean"],
                             rtol=1e-2, atol=1e-3)
  np.testing.assert_allclose(y, y32, rtol=5e-2, atol=5e-2)


def test_the_dtype_is_restored_after_the_call_and_float32_changes_nothing():
  x = jnp.ones((2, 5, 5, 3))
  _, _, _, seen = _outputs(jnp.float32, x)
  assert set(seen.values()) == {jnp.dtype(jnp.float32)}
  model = nn.Dense(2)
  variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  with lvf.compute_dtype("bfloat16"):
    assert model.apply(variables, jnp.ones((1, 3))).dtype == jnp.bfloat16
  assert model.dtype is None
  assert model.apply(variables, jnp.ones((1, 3))).dtype == jnp.float32


def test_gradients_reach_float32_parameters_through_the_casts():
  model = nn.Dense(2)
  x = jnp.ones((4, 3))
  variables = model.init(jax.random.key(0), x)

  def loss(params):
    with lvf.compute_dtype(jnp.bfloat16):
      y = model.apply({"params": params}, x.astype(jnp.bfloat16))
    return jnp.sum(y.astype(jnp.float32) ** 2)

  grads = jax.grad(loss)(variables["params"])
  ref = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(
      variables["params"])
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, r, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("bad", ["int8", "float64", "half-ish", 3])
def test_a_dtype_it_cannot_compute_in_is_an_error(bad):
  with pytest.raises(ValueError, match="dtype must be one of float32, "
                     "bfloat16, float16"):
    with lvf.compute_dtype(bad):
      pass
