"""Training-mode BatchNorm with a written-out backward (layers/batchnorm_train.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf
import lowrank_vjp.rules as lvr

SHAPE = (8, 6, 6, 5)


def _x(shape=SHAPE, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * 3.0 + 1.0


def _params(c, seed=1):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"scale": jax.random.normal(k1, (c,)) + 1.0,
          "bias": jax.random.normal(k2, (c,))}


def _loss_and_grads(module, x, params, stats, running):
  """Loss, (d params, d x), output and new batch_stats of a BatchNorm."""
  w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

  def loss(p, x, stats, w):
    y, state = module.apply({"params": p, "batch_stats": stats}, x,
                            use_running_average=running,
                            mutable=["batch_stats", "compression"])
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * w), (y, state)

  # Jitted: op by op, every operation compiled on its own (seconds a test).
  (l, (y, state)), grads = jax.jit(jax.value_and_grad(
      loss, (0, 1), has_aux=True))(params, x, stats, w)
  return l, grads, y, state["batch_stats"]


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("axis,shape,fast", [(-1, SHAPE, True),
                                             (1, (4, 5, 6, 6), True),
                                             (-1, SHAPE, False)])
def test_exact_mode_equals_flax_batchnorm(axis, shape, fast):
  x = _x(shape)
  kw = dict(axis=axis, momentum=0.9, use_fast_variance=fast)
  ref, ours = nn.BatchNorm(**kw), lvf.BatchNorm(**kw)
  stats = ref.init(jax.random.PRNGKey(0), x, use_running_average=True)[
      "batch_stats"]
  params = _params(shape[axis])
  for running in (False, True):
    l0, g0, y0, s0 = _loss_and_grads(ref, x, params, stats, running)
    l1, g1, y1, s1 = _loss_and_grads(ours, x, params, stats, running)
    np.testing.assert_array_equal(y1, y0)
    for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g0, s0))):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(
          jnp.max(jnp.abs(b))))


def test_bfloat16_input_exact_mode():
  x = _x().astype(jnp.bfloat16)
  ref, ours = nn.BatchNorm(), lvf.BatchNorm()
  stats = ref.init(jax.random.PRNGKey(0), x, use_running_average=True)[
      "batch_stats"]
  params = _params(SHAPE[-1])
  _, g0, y0, _ = _loss_and_grads(ref, x, params, stats, False)
  _, g1, y1, _ = _loss_and_grads(ours, x, params, stats, False)
  assert y1.dtype == y0.dtype == jnp.float32   # as Flax: x, params promoted
  np.testing.assert_array_equal(y1, y0)
  assert g1[1].dtype == jnp.bfloat16
  assert _rel(g1[1].astype(jnp.float32), g0[1].astype(jnp.float32)) < 1e-2
  assert _rel(g1[0]["scale"], g0[0]["scale"]) < 1e-5


def test_codes_bound_the_gradient_error_and_keep_running_mode_dx_exact():
  x = _x((16, 8, 8, 12))
  params = _params(12)
  ref = nn.BatchNorm()
  stats = ref.init(jax.random.PRNGKey(0), x, use_running_average=True)[
      "batch_stats"]
  stats = {"mean": jnp.full((12,), 0.5), "var": jnp.full((12,), 8.0)}
  _, g0, _, _ = _loss_and_grads(ref, x, params, stats, False)
  _, g8, _, _ = _loss_and_grads(lvf.BatchNorm(method="quant"), x, params,
                                stats, False)
  errors = {"dx": _rel(g8[1], g0[1]), "dscale": _rel(g8[0]["scale"],
                                                     g0[0]["scale"])}
  assert 0 < errors["dx"] < 0.03 and 0 < errors["dscale"] < 0.03, errors
  np.testing.assert_array_equal(g8[0]["bias"], g0[0]["bias"])
  # Running averages: dx = g·γ·r needs no residual, so it stays exact.
  _, r0, _, _ = _loss_and_grads(ref, x, params, stats, True)
  _, r8, _, _ = _loss_and_grads(lvf.BatchNorm(method="quant"), x, params,
                                stats, True)
  np.testing.assert_allclose(r8[1], r0[1], rtol=1e-5, atol=1e-7)


def _residual_bytes(method, x):
  params = _params(x.shape[-1])
  f = lambda x, s, b: lv.batch_norm(x, s, b, method=method)[0]
  return lv.measure.vjp_residual_bytes(f, x, params["scale"],
                                       params["bias"])


def test_residual_is_codes_plus_statistics():
  x = _x((16, 8, 8, 32))
  c = x.shape[-1]
  exact = _residual_bytes(None, x)
  codes8 = _residual_bytes("quant", x)
  codes4 = _residual_bytes(lv.methods.Quant(bits=4, per_channel=True), x)
  assert exact <= x.nbytes + 16 * c
  assert codes8 <= x.size + 64 * c
  assert codes4 <= x.size // 2 + 64 * c
  bn = nn.BatchNorm(use_running_average=False)
  v = bn.init(jax.random.PRNGKey(0), x)
  flax_bytes = lv.measure.vjp_residual_bytes(
      lambda x, p: bn.apply({"params": p, **{"batch_stats": v["batch_stats"]}},
                            x, mutable=["batch_stats"])[0], x, v["params"])
  assert flax_bytes >= x.nbytes  # what the written-out backward replaces


def test_gradients_through_returned_statistics():
  x = _x()
  w = jax.random.normal(jax.random.PRNGKey(5), x.shape)

  def ours(x):
    y, m, v = lv.batch_norm(x, None, None)
    return jnp.sum(y * w) + jnp.sum(m**2) + jnp.sum(jnp.sqrt(v))

  def reference(x):
    m = x.mean((0, 1, 2))
    v = jnp.maximum(0.0, (x * x).mean((0, 1, 2)) - m * m)
    y = (x - m) * jax.lax.rsqrt(v + 1e-5)
    return jnp.sum(y * w) + jnp.sum(m**2) + jnp.sum(jnp.sqrt(v))

  np.testing.assert_allclose(jax.jit(jax.grad(ours))(x),
                             jax.jit(jax.grad(reference))(x),
                             rtol=1e-4, atol=1e-6)


def test_statistics_over_a_named_axis():
  x = _x((2, 4, 6, 6, 5))
  w = jax.random.normal(jax.random.PRNGKey(3), x.shape[1:])
  scale = jnp.arange(1.0, 6.0)

  def ours(x):
    y, m, _ = lv.batch_norm(x, scale, None, axis_name="d")
    return jnp.sum(y * w) + jnp.sum(m**2)

  def reference(x):
    m, m2 = jax.lax.pmean((x.mean((0, 1, 2)), (x * x).mean((0, 1, 2))), "d")
    y = (x - m) * (jax.lax.rsqrt(jnp.maximum(0.0, m2 - m * m) + 1e-5) * scale)
    return jnp.sum(y * w) + jnp.sum(m**2)

  got = jax.jit(jax.vmap(jax.grad(ours), axis_name="d"))(x)
  want = jax.jit(jax.vmap(jax.grad(reference), axis_name="d"))(x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", [None, lv.methods.Quant(per_channel=True)])
def test_nan_is_carried_and_constant_channels_stay_finite(method):
  x = _x().at[0, 0, 0, 2].set(jnp.nan).at[..., 3].set(7.0)
  g = jax.grad(lambda x: jnp.sum(lv.batch_norm(x, None, None,
                                               method=method)[0] ** 2))(x)
  assert bool(jnp.isnan(g[..., 2]).any())       # the NaN is not hidden
  assert bool(jnp.isfinite(g[..., [0, 1, 3, 4]]).all())


def test_bad_arguments_are_named():
  x = _x()
  with pytest.raises(ValueError, match="stateful"):
    lv.batch_norm(x, None, None, method="asi")
  with pytest.raises(ValueError, match="convolutions only"):
    lv.batch_norm(x, None, None, method="gradfilter")
  with pytest.raises(ValueError, match=r"scale must have shape \(5,\)"):
    lv.batch_norm(x, jnp.ones(4), None)
  with pytest.raises(ValueError, match="both mean and var"):
    lv.batch_norm(x, None, None, mean=jnp.zeros(5))
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    lv.batch_norm(x, None, None, epsilon=0.0)
  with pytest.raises(ValueError, match="mask"):
    lvf.BatchNorm(use_running_average=False).init(
        jax.random.PRNGKey(0), x, mask=jnp.ones(x.shape, bool))


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(6, (3, 3), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(name="bn")(x, use_running_average=not train)
    return nn.Dense(3, name="head")(jnp.mean(lv.relu(x), (1, 2)))


def _plan_grads(rule):
  x = _x((4, 8, 8, 3))
  net = _Net()
  variables = net.init(jax.random.PRNGKey(0), x)
  plan = lvr.plan(net, [rule, lvr.Rule("head")], x, variables=variables)
  trained, frozen = plan.split(variables)

  def loss(t):
    with plan.intercept():
      y, state = net.apply(plan.merge(t, frozen), x,
                           mutable=["batch_stats", "compression"])
    return jnp.sum(y**2), state

  (_, state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      trained)
  return plan, grads, lvf.collect_stats(state)


def test_rules_give_trained_batchnorms_codes_under_a_compressing_rule():
  plan, _, stats = _plan_grads(lvr.Rule(
      "conv", lv.methods.Hosvd(on_overflow="ignore"), train_bn=True))
  assert plan.train_bn == ("bn",)
  assert plan.bn_methods == (("bn", lv.methods.Quant(bits=8,
                                                     per_channel=True)),)
  assert stats["bn"].method == "quant"
  assert "x̂ as Quant" in plan.describe()
  # An uncompressed rule leaves Flax's own BatchNorm in place.
  plan, _, stats = _plan_grads(lvr.Rule("conv", None, train_bn=True))
  assert plan.bn_methods == () and "bn" not in stats


def test_rules_exact_batchnorm_reproduces_flax_gradients():
  _, g_flax, _ = _plan_grads(lvr.Rule("conv", None, train_bn=True))
  _, g_ours, stats = _plan_grads(lvr.Rule("conv", lv.methods.Hosvd(eps=1.0),
                                          train_bn=True, bn_method=None))
  assert stats["bn"].method == "exact"
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_flax)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(
        jnp.max(jnp.abs(b))))


def test_rule_rejects_a_stateful_bn_method():
  with pytest.raises(ValueError, match="bn_method.*stateful"):
    lvr.Rule("conv", "hosvd", train_bn=True, bn_method="asi")
