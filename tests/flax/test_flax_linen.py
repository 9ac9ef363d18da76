"""Tests for lowrank_vjp.flax (Linen adapters) and the drop-ins in NNX."""

from __future__ import annotations

import math
import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf
from lowrank_vjp._src.tensor import hosvd as decompositions

FULL = dict(method="hosvd", eps=1.0)
LOSSY = dict(method="hosvd", eps=0.5, rank_fraction=0.5, on_overflow="ignore")
LOSSY_SVD = dict(method="svd", eps=0.5, rank_fraction=0.5, on_overflow="ignore")


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _assert_trees_close(a, b, tol=2e-5):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    assert x.shape == y.shape
    assert _rel_err(x, y) <= tol, _rel_err(x, y)


def _normal(shape, seed):
  # NumPy keeps the tests free of per-shape compilations of jax.random.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def _cotangent(shape, seed=7):
  return _normal(shape, seed)


def _init_params(layer, x, seed=1):
  """Random parameters of the right shapes, without compiling ``init``."""
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  leaves, treedef = jax.tree.flatten(shapes)
  return jax.tree.unflatten(treedef, [
      0.3 * _normal(leaf.shape, seed + i) for i, leaf in enumerate(leaves)])


def _linen_run(layer, params, x, g):
  """Jitted ``(y, sown state, (d params, d x))`` of ``<layer(x), g>``."""

  def loss(p, x):
    y, state = layer.apply({"params": p}, x, mutable=["compression"])
    return jnp.sum(y * g), (y, state)

  (_, (y, state)), grads = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return y, state, grads


def _check_stats(stats, x_shape, settings):
  method = lv.methods.resolve(**settings)
  capacity = (method.capacity(x_shape, batch_axis=0)
              if isinstance(method, lv.methods.TuckerMethod)
              else (None,) * len(x_shape))
  n = len(x_shape)
  assert isinstance(stats, lv.CompressionStats)
  assert stats.shape == tuple(x_shape)
  assert stats.capacity == capacity
  assert stats.needed_ranks.shape == (n,)
  assert stats.kept_ranks.shape == (n,)
  assert stats.kept_energy.shape == (n,)
  assert stats.overflow.shape == ()
  kept = np.asarray(stats.kept_ranks)
  bound = [i if k is None else k
           for i, k in zip(x_shape, capacity, strict=True)]
  assert np.all(kept >= 1) and np.all(kept <= np.asarray(bound))
  core = math.prod(bound) * 4
  factors = sum(i * k for i, k in zip(x_shape, capacity, strict=True) if k) * 4
  assert stats.residual_nbytes == core + factors
  if settings["eps"] == 1.0:
    assert not bool(stats.overflow)
    np.testing.assert_allclose(stats.kept_energy, 1.0, rtol=1e-5)


# ------------------------------------------------------------- linen conv ---

CONV_CASES = {
    "nhwc_same": (dict(features=6, kernel_size=(3, 3)), (2, 6, 6, 4)),
    "strided_valid": (dict(features=5, kernel_size=(3, 3), strides=(2, 2),
                           padding="VALID"), (2, 7, 7, 3)),
    "explicit_pad_dilated": (dict(features=4, kernel_size=(2, 3),
                                  padding=((1, 2), (0, 1)),
                                  kernel_dilation=(1, 2)), (3, 6, 5, 2)),
    "groups": (dict(features=6, kernel_size=(3, 3), feature_group_count=2),
               (2, 5, 5, 4)),
    "conv1d": (dict(features=3, kernel_size=(3,), strides=(2,)), (4, 9, 2)),
}


def _linen_conv_setup(case, settings):
  kwargs, x_shape = CONV_CASES[case]
  plain = nn.Conv(**kwargs)
  comp = nn.Conv(**kwargs, conv_general_dilated_cls=lvf.conv_cls(**settings))
  x = _normal(x_shape, 0)
  params = _init_params(plain, x)
  return plain, comp, params, x


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_linen_conv_full_rank_matches_plain(case):
  plain, comp, params, x = _linen_conv_setup(case, FULL)
  g = _cotangent(jax.eval_shape(plain.apply, {"params": params}, x).shape)
  y_ref, _, grads_ref = _linen_run(plain, params, x, g)
  y, state, grads = _linen_run(comp, params, x, g)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  _assert_trees_close(grads, grads_ref)
  stats = lvf.collect_stats(state)
  assert list(stats) == [""]
  _check_stats(stats[""], x.shape, FULL)


@pytest.mark.parametrize("case,settings", [
    ("nhwc_same", LOSSY), ("strided_valid", LOSSY), ("groups", LOSSY),
    ("nhwc_same", LOSSY_SVD)], ids=["nhwc_same", "strided_valid", "groups",
                                    "nhwc_same_svd"])
def test_linen_conv_lossy_input_grad_exact(case, settings):
  plain, comp, params, x = _linen_conv_setup(case, settings)
  g = _cotangent(jax.eval_shape(plain.apply, {"params": params}, x).shape)
  y_ref, _, (dp_ref, dx_ref) = _linen_run(plain, params, x, g)
  y, state, (dp, dx) = _linen_run(comp, params, x, g)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  assert _rel_err(dx, dx_ref) < 2e-6
  np.testing.assert_allclose(dp["bias"], dp_ref["bias"], rtol=1e-5,
                             atol=1e-5)
  # The kernel gradient uses the compressed activation, so it differs.
  assert np.all(np.isfinite(dp["kernel"]))
  assert _rel_err(dp["kernel"], dp_ref["kernel"]) > 1e-4
  _check_stats(lvf.collect_stats(state)[""], x.shape, settings)


def test_linen_conv_no_stats_unless_mutable():
  _, comp, params, x = _linen_conv_setup("nhwc_same", LOSSY)
  y = jax.eval_shape(comp.apply, {"params": params}, x)
  assert isinstance(y, jax.ShapeDtypeStruct)  # Not a (y, state) pair.
  # init sows nothing (its statistics, merged back, would grow every step).
  variables = jax.eval_shape(comp.init, jax.random.key(1), x)
  assert set(variables) == {"params"}


def test_custom_collection_name():
  kwargs, x_shape = CONV_CASES["nhwc_same"]
  conv = nn.Conv(**kwargs, conv_general_dilated_cls=lvf.conv_cls(
      collection="lowrank", **LOSSY))
  x = jnp.ones(x_shape)
  params = _init_params(conv, x)
  _, state = jax.jit(lambda p, x: conv.apply({"params": p}, x,
                                             mutable=["lowrank"]))(params, x)
  assert set(state) == {"lowrank"}
  assert list(lvf.collect_stats(state, collection="lowrank")) == [""]


def test_shared_layer_called_twice_stacks_stats():

  class Twice(nn.Module):

    @nn.compact
    def __call__(self, x):
      conv = nn.Conv(3, (3, 3), name="shared",
                     conv_general_dilated_cls=lvf.conv_cls(**LOSSY))
      return conv(conv(x))

  x = _normal((2, 5, 5, 3), 0)
  params = _init_params(Twice(), x)
  _, state = jax.jit(lambda p, x: Twice().apply(
      {"params": p}, x, mutable=["compression"]))(params, x)
  stats = lvf.collect_stats(state)
  assert list(stats) == ["shared"]
  assert stats["shared"].needed_ranks.shape == (2, 4)


def test_conv_local_leaks_no_tracers():
  # ConvLocal only runs the cls under jax.eval_shape to infer a shape.
  layer = nn.ConvLocal(3, (3, 3), conv_general_dilated_cls=lvf.conv_cls())
  x = jnp.ones((1, 4, 4, 2))
  assert set(jax.eval_shape(layer.init, jax.random.key(0), x)) == {"params"}
  params = _init_params(layer, x)
  _, state = jax.jit(lambda p, x: layer.apply(
      {"params": p}, x, mutable=["compression"]))(params, x)
  assert lvf.collect_stats(state) == {}


def test_stats_under_lifted_transforms():

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x, _):
      return nn.Dense(4, dot_general_cls=lvf.dense_cls(**LOSSY))(x), None

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      x, _ = nn.remat(Block)(name="remat")(x, None)
      scan = nn.scan(Block, variable_axes={"params": 0, "compression": 0},
                     split_rngs={"params": True}, length=3)
      x, _ = scan(name="scan")(x, None)
      return x

  x = _normal((5, 4), 0)
  params = _init_params(Net(), x)

  def loss(p):
    y, state = Net().apply({"params": p}, x, mutable=["compression"])
    return y.sum(), state

  grads, state = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  stats = lvf.collect_stats(state)
  assert list(stats) == ["remat/Dense_0", "scan/Dense_0"]
  assert stats["remat/Dense_0"].needed_ranks.shape == (2,)
  assert stats["scan/Dense_0"].needed_ranks.shape == (3, 2)


def test_cls_settings_are_validated():
  with pytest.raises(ValueError, match="eps"):
    lvf.conv_cls(eps=2.0)
  with pytest.raises(TypeError):
    lvf.dense_cls(epsilon=0.5)
  cls = lvf.dense_cls(method="svd", eps=0.8)
  module = cls()
  assert isinstance(module, lvf.CompressedDotGeneral)
  assert module.method == lv.methods.Svd(eps=0.8)
  assert module.collection == "compression"


# --------------------------------------------------------------- linen asi ---

DN = ("NHWC", "HWIO", "NHWC")


def _asi_setup(rank_fraction=0.5, case="nhwc_same"):
  kwargs, x_shape = CONV_CASES[case]
  plain = nn.Conv(**kwargs)
  comp = nn.Conv(**kwargs, conv_general_dilated_cls=lvf.conv_cls(
      method="asi", rank_fraction=rank_fraction))
  x = _normal(x_shape, 0)
  params = _init_params(plain, x)
  asi_state = jax.jit(lambda x: comp.init(jax.random.key(0), x))(x)[
      "asi_state"]
  return plain, comp, params, asi_state, x


def _asi_run(layer, params, asi_state, x, g):
  """Jitted ``(y, new asi_state, sown stats, (d params, d x))``."""

  def loss(p, x):
    y, state = layer.apply({"params": p, "asi_state": asi_state}, x,
                           mutable=["asi_state", "compression"])
    return jnp.sum(y * g), (y, state)

  (_, (y, state)), grads = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return y, state["asi_state"], lvf.collect_stats(state)[""], grads


def _pure_asi(params, x, g, state, rank_fraction):
  """``"nhwc_same"``'s step through the pure API: ``(dW, new AsiState)``."""
  conv = lv.compressed_conv(method=lv.methods.Asi(rank_fraction=rank_fraction))

  def loss(w):
    y, _, new = conv.with_state(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                state=state)
    return jnp.sum((y + params["bias"]) * g), new

  return jax.jit(jax.grad(loss, has_aux=True))(params["kernel"])


def _projector(u):
  u = np.asarray(u, np.float64)
  return u @ u.T


def _as_asi_state(tree, capacity):
  del capacity
  layer = tree["CompressedConvGeneralDilated_0"]
  return lv.methods.AsiState(factors=dict(layer["factors"]),
                             started=layer["started"])


def _factors(state, capacity):
  """An ``AsiState``'s factors as one entry per axis (None: uncompressed)."""
  return tuple(None if k is None else state.factors[str(a)]
               for a, k in enumerate(capacity))


def test_asi_state_layout():
  _, comp, _, asi_state, x = _asi_setup()
  layer = asi_state["CompressedConvGeneralDilated_0"]
  capacity = lv.methods.Asi(rank_fraction=0.5).capacity(x.shape)
  assert set(layer) == {"factors", "started"}
  assert {k: v.shape for k, v in layer["factors"].items()} == {
      str(a): (n, k) for a, (n, k) in enumerate(zip(x.shape, capacity,
                                                   strict=True))}
  assert layer["started"].dtype == jnp.bool_ and not bool(layer["started"])
  init = lv.methods.AsiState.init(x.shape, capacity)
  assert sorted(init.factors) == sorted(layer["factors"])
  for a, f in init.factors.items():
    np.testing.assert_array_equal(layer["factors"][a], f)
  # Uncompressed axes hold no factor (no None leaves).
  conv = nn.Conv(6, (3, 3), conv_general_dilated_cls=lvf.conv_cls(
      method="asi", ranks=(None, 3, 3, None)))
  factors = jax.eval_shape(conv.init, jax.random.key(0), x)["asi_state"][
      "CompressedConvGeneralDilated_0"]["factors"]
  assert sorted(factors) == ["1", "2"]
  assert lvf.ASI_COLLECTION == "asi_state"


def test_asi_linen_first_step_is_the_exact_hosvd():
  plain, comp, params, asi_state, x = _asi_setup()
  capacity = lv.methods.Asi(rank_fraction=0.5).capacity(x.shape)
  g = _cotangent(jax.eval_shape(plain.apply, {"params": params}, x).shape)
  y, new_state, stats, (dp, _) = _asi_run(comp, params, asi_state, x, g)
  y_ref = jax.jit(plain.apply)({"params": params}, x)
  np.testing.assert_array_equal(y, y_ref)
  # The same step as asi_conv's cold step (the exact HOSVD at those ranks).
  dw, pure_state = _pure_asi(
      params, x, g, lv.methods.AsiState.init(x.shape, capacity), 0.5)
  assert _rel_err(dp["kernel"], dw) < 1e-5
  exact, _ = jax.jit(lambda x: decompositions.tucker_compress(  # one compile
      x, capacity, 1.0, "hosvd"))(x)
  new = _as_asi_state(new_state, capacity)
  assert bool(new.started)
  for u, v, e in zip(_factors(new, capacity), _factors(pure_state, capacity),
                     exact.factors, strict=True):
    np.testing.assert_allclose(_projector(u), _projector(v), atol=1e-5)
    np.testing.assert_allclose(_projector(u), _projector(e), atol=1e-5)
  assert stats.method == "asi" and stats.capacity == capacity
  np.testing.assert_array_equal(stats.needed_ranks, capacity)


def test_asi_linen_warm_step_and_mutability():
  plain, comp, params, asi_state, x = _asi_setup()
  capacity = lv.methods.Asi(rank_fraction=0.5).capacity(x.shape)
  g = _cotangent(jax.eval_shape(plain.apply, {"params": params}, x).shape)
  _, state1, _, _ = _asi_run(comp, params, asi_state, x, g)
  x2 = x + 0.3 * _normal(x.shape, 5)
  _, state2, _, (dp, _) = _asi_run(comp, params, state1, x2, g)
  # The warm step refreshes the factors as asi_conv does from them.
  dw, pure = _pure_asi(params, x2, g, _as_asi_state(state1, capacity), 0.5)
  assert _rel_err(dp["kernel"], dw) < 1e-5
  new = _as_asi_state(state2, capacity)
  old = _as_asi_state(state1, capacity)
  for u, v in zip(_factors(new, capacity), _factors(pure, capacity),
                  strict=True):
    np.testing.assert_allclose(_projector(u), _projector(v), atol=1e-5)
  assert any(not np.allclose(_projector(u), _projector(v), atol=1e-3)
             for u, v in zip(_factors(new, capacity), _factors(old, capacity),
                             strict=True))
  # Not mutable: the state is read, nothing is written or returned.
  y = jax.jit(comp.apply)({"params": params, "asi_state": state1}, x2)
  np.testing.assert_array_equal(y, jax.jit(plain.apply)({"params": params},
                                                        x2))
  # No state and not mutable: a clear error.
  with pytest.raises(ValueError, match="no Asi state"):
    jax.eval_shape(comp.apply, {"params": params}, x)
  # Created by an apply (collection mutable, none given): stored unstarted.
  _, state = jax.jit(lambda p, x: comp.apply(
      {"params": p}, x, mutable=["asi_state"]))(params, x)
  assert not bool(state["asi_state"]["CompressedConvGeneralDilated_0"]["started"])
  # Factors of another shape: a clear error.
  other = jax.jit(lambda x: comp.init(jax.random.key(0), x))(
      _normal((3, 6, 6, 4), 1))["asi_state"]
  with pytest.raises(ValueError, match="shapes"):
    jax.eval_shape(lambda p, s: comp.apply(
        {"params": p, "asi_state": s}, x, mutable=["asi_state"]), params,
                   other)


@pytest.mark.parametrize("case", ["nhwc_same", "strided_valid", "groups"])
def test_asi_linen_forward_and_input_grad_exact(case):
  plain, comp, params, asi_state, x = _asi_setup(0.25, case)
  g = _cotangent(jax.eval_shape(plain.apply, {"params": params}, x).shape)
  y_ref, _, (dp_ref, dx_ref) = _linen_run(plain, params, x, g)
  for _ in range(2):   # cold, then warm
    y, asi_state, _, (dp, dx) = _asi_run(comp, params, asi_state, x, g)
    np.testing.assert_array_equal(y, y_ref)
    assert _rel_err(dx, dx_ref) < 2e-6
    np.testing.assert_allclose(dp["bias"], dp_ref["bias"], rtol=1e-5,
                               atol=1e-5)
    assert _rel_err(dp["kernel"], dp_ref["kernel"]) > 1e-4


@pytest.mark.parametrize("case", ["nhwc_same", "groups", "conv1d"])
def test_asi_linen_full_rank_matches_plain(case):
  plain, comp, params, asi_state, x = _asi_setup(1.0, case)
  g = _cotangent(jax.eval_shape(plain.apply, {"params": params}, x).shape)
  y_ref, _, grads_ref = _linen_run(plain, params, x, g)
  for _ in range(2):   # cold, then warm
    y, asi_state, _, grads = _asi_run(comp, params, asi_state, x, g)
    np.testing.assert_array_equal(y, y_ref)
    _assert_trees_close(grads, grads_ref)


def test_asi_stats_keyed_by_layer_path():

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      asi = lvf.conv_cls(method="asi")
      x = nn.Conv(4, (3, 3), name="conv1", conv_general_dilated_cls=asi)(x)
      return nn.Conv(4, (3, 3), name="conv2", conv_general_dilated_cls=asi)(
          lv.relu(x))

  x = _normal((2, 5, 5, 3), 0)
  variables = jax.jit(Net().init)(jax.random.key(0), x)
  assert set(variables["asi_state"]) == {"conv1", "conv2"}
  _, state = jax.jit(lambda v, x: Net().apply(
      v, x, mutable=["asi_state", "compression"]))(variables, x)
  assert sorted(lvf.collect_stats(state)) == ["conv1", "conv2"]


def test_asi_conv_local_leaks_no_tracers():
  layer = nn.ConvLocal(3, (3, 3), conv_general_dilated_cls=lvf.conv_cls(
      method="asi"))
  x = jnp.ones((1, 4, 4, 2))
  assert set(jax.eval_shape(layer.init, jax.random.key(0), x)) == {"params"}


def test_asi_cls_settings():
  cls = lvf.conv_cls(method="asi")
  module = cls()
  assert isinstance(module, lvf.CompressedConvGeneralDilated)
  assert module.method == lv.methods.Asi()
  assert (module.method.ranks, module.method.rank_fraction) == (None, 0.25)
  assert (module.collection, module.state_collection) == (
      "compression", "asi_state")
  module = lvf.conv_cls(method="asi", ranks=[2, None, 3, 4],
                        rank_fraction=0.5, collection="c",
                        state_collection="s")()
  assert module.method.ranks == (2, None, 3, 4)   # hashable
  assert (module.collection, module.state_collection) == ("c", "s")
  for key in ("eps", "on_overflow", "bits"):
    with pytest.raises(TypeError, match=key):
      lvf.conv_cls(method="asi", **{key: 0.8})
  with pytest.raises(ValueError, match="rank_fraction"):
    lvf.conv_cls(method="asi", rank_fraction=1.5)
  with pytest.raises(ValueError, match="collection"):
    lvf.conv_cls(method="asi", collection=3)
  # ASI is an ordinary method: dense layers take it too.
  assert lvf.dense_cls(method="asi")().method == lv.methods.Asi()


# ------------------------------------------------------------ linen dense ---

DENSE_CASES = {
    "2d": (lambda **kw: nn.Dense(5, **kw), (6, 12)),
    "2d_wide": (lambda **kw: nn.Dense(3, **kw), (4, 16)),
    "3d": (lambda **kw: nn.Dense(5, **kw), (3, 4, 6)),
    "dense_general": (lambda **kw: nn.DenseGeneral((2, 3), **kw), (3, 4, 6)),
}


@pytest.mark.parametrize("case", sorted(DENSE_CASES))
@pytest.mark.parametrize("settings", [FULL, LOSSY], ids=["full", "lossy"])
def test_linen_dense(case, settings):
  make, x_shape = DENSE_CASES[case]
  plain, comp = make(), make(dot_general_cls=lvf.dense_cls(**settings))
  x = _normal(x_shape, 0)
  params = _init_params(plain, x)
  g = _cotangent(jax.eval_shape(plain.apply, {"params": params}, x).shape)
  y_ref, _, (dp_ref, dx_ref) = _linen_run(plain, params, x, g)
  y, state, (dp, dx) = _linen_run(comp, params, x, g)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  if settings["eps"] == 1.0:
    _assert_trees_close((dp, dx), (dp_ref, dx_ref))
  else:
    assert _rel_err(dx, dx_ref) < 2e-6
    assert _rel_err(dp["kernel"], dp_ref["kernel"]) > 1e-4
  stats = lvf.collect_stats(state)
  assert list(stats) == [""]
  _check_stats(stats[""], x_shape, settings)


# ------------------------------------------------------- linen training ---


CNN_SETTINGS = dict(method="hosvd", eps=0.9, on_overflow="ignore")


class SmallCNN(nn.Module):
  """conv → lv.relu → conv → mean → dense, every layer compressed."""

  @nn.compact
  def __call__(self, x):
    settings = CNN_SETTINGS
    x = nn.Conv(8, (3, 3), name="conv1",
                conv_general_dilated_cls=lvf.conv_cls(**settings))(x)
    x = lv.relu(x)
    x = nn.Conv(8, (3, 3), strides=(2, 2), name="conv2",
                conv_general_dilated_cls=lvf.conv_cls(**settings))(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(3, name="head",
                    dot_general_cls=lvf.dense_cls(**settings))(x)


def test_linen_cnn_trains_under_jit():
  model = SmallCNN()
  x = _normal((8, 8, 8, 3), 0)
  labels = jnp.arange(8) % 3
  params = _init_params(model, x)
  tx = optax.sgd(0.2)
  opt_state = tx.init(params)

  def loss_fn(params):
    logits, state = model.apply({"params": params}, x,
                                mutable=["compression"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), state

  @jax.jit
  def train_step(params, opt_state):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, state

  losses = []
  for _ in range(6):
    params, opt_state, loss, state = train_step(params, opt_state)
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert np.all(np.diff(losses) < 0), losses
  stats = lvf.collect_stats(state)
  assert list(stats) == ["conv1", "conv2", "head"]
  assert stats["conv1"].shape == (8, 8, 8, 3)
  assert stats["conv2"].shape == (8, 8, 8, 8)
  assert stats["head"].shape == (8, 8)
  for name in ("conv1", "conv2"):
    assert stats[name].residual_nbytes < stats[name].activation_nbytes


# ------------------------------------------------------------------ nnx ---


def _nnx_pair(kind, settings):
  if kind == "conv":
    drop_in = dict(conv_general_dilated=lv.compressed_conv(**settings))
    make = lambda **kw: nnx.Conv(4, 6, (3, 3), strides=(2, 1),
                                 rngs=nnx.Rngs(0), **kw)
    x_shape = (2, 7, 6, 4)
  else:
    drop_in = dict(dot_general=lv.compressed_dense(**settings))
    make = lambda **kw: nnx.Linear(6, 5, rngs=nnx.Rngs(0), **kw)
    x_shape = (3, 4, 6)
  return make(), make(**drop_in), _normal(x_shape, 3)


def _nnx_run(model, x, g):
  """Jitted ``(y, (d params, d x))`` of ``<model(x), g>``."""
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params, x):
    y = nnx.merge(graphdef, params)(x)
    return jnp.sum(y * g), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                             has_aux=True))(params, x)
  return y, grads


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("settings", [FULL, LOSSY], ids=["full", "lossy"])
def test_nnx_layers(kind, settings):
  plain, comp, x = _nnx_pair(kind, settings)
  _assert_trees_close(nnx.state(comp, nnx.Param), nnx.state(plain, nnx.Param),
                      tol=0.0)
  g = _cotangent(jax.eval_shape(plain, x).shape)
  y_ref, (dp_ref, dx_ref) = _nnx_run(plain, x, g)
  y, (dp, dx) = _nnx_run(comp, x, g)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  if settings["eps"] == 1.0:
    _assert_trees_close((dp, dx), (dp_ref, dx_ref))
  else:
    assert _rel_err(dx, dx_ref) < 2e-6
    assert _rel_err(dp["kernel"], dp_ref["kernel"]) > 1e-4


def test_nnx_jit_train_step():
  class Net(nnx.Module):

    def __init__(self, rngs):
      conv = lv.compressed_conv(eps=0.9, on_overflow="ignore")
      self.conv = nnx.Conv(3, 8, (3, 3), conv_general_dilated=conv,
                           rngs=rngs)
      self.head = nnx.Linear(8, 3, rngs=rngs, dot_general=lv.compressed_dense(
          eps=0.9, on_overflow="ignore"))

    def __call__(self, x):
      return self.head(lv.relu(self.conv(x)).mean(axis=(1, 2)))

  model = Net(nnx.Rngs(0))
  x = _normal((8, 6, 6, 3), 0)
  labels = jnp.arange(8) % 3
  y_eager = model(x)

  # jax.jit through split/merge gives the eager output.
  graphdef, state = nnx.split(model)
  y_jit = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  np.testing.assert_allclose(y_jit, y_eager, rtol=1e-5, atol=1e-6)

  optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, labels):

    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, x, labels)) for _ in range(6)]
  assert all(np.isfinite(losses))
  assert np.all(np.diff(losses) < 0), losses


# -------------------------------------------------------------- namespace ---


def test_namespace():
  assert lv.flax is lvf
  assert set(lvf.__all__) == {
      "ASI_COLLECTION", "BatchNorm", "COLLECTION", "LayerNorm", "RMSNorm",
      "CompressedConvGeneralDilated", "CompressedDotGeneral",
      "FrozenBatchNorm", "StatsDroppedWarning", "collect_stats", "conv_cls",
      "compute_dtype", "dense_cls"}
  for name in lvf.__all__:
    assert getattr(lvf, name) is not None
  # The package's own `flax.py` does not shadow the real Flax.
  assert flax.__name__ == "flax" and hasattr(flax, "linen")
  assert nn.Module is flax.linen.Module
  assert issubclass(lvf.CompressedConvGeneralDilated, flax.linen.Module)


def test_asi_dense_full_rank_matches_plain_and_carries_state():
  """ASI is an ordinary method: nn.Dense takes it like nn.Conv does."""
  x = _normal((6, 5, 8), 0)
  plain = nn.Dense(4)
  comp = nn.Dense(4, dot_general_cls=lvf.dense_cls("asi", rank_fraction=1.0))
  params = _init_params(plain, x)
  state = jax.jit(lambda x: comp.init(jax.random.key(0), x))(x)["asi_state"]
  layer = state["CompressedDotGeneral_0"]
  assert {k: v.shape for k, v in layer["factors"].items()} == {
      "0": (6, 6), "1": (5, 5), "2": (8, 8)}
  g = _cotangent((6, 5, 4))
  y_ref, _, grads_ref = _linen_run(plain, params, x, g)
  for _ in range(2):   # cold, then warm
    def loss(p, x, s):
      y, new = comp.apply({"params": p, "asi_state": s}, x,
                          mutable=["asi_state", "compression"])
      return jnp.sum(y * g), (y, new)

    (_, (y, new)), grads = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True))(params, x, state)
    state = new["asi_state"]
    np.testing.assert_array_equal(y, y_ref)
    _assert_trees_close(grads, grads_ref)
    assert lvf.collect_stats(new)[""].method == "asi"
  assert bool(state["CompressedDotGeneral_0"]["started"])


# ------------------------------------------------ statistics' plumbing ---


def test_linen_cls_handed_to_nnx_says_what_to_use():
  from flax import nnx
  conv = nnx.Conv(3, 4, (3, 3), conv_general_dilated=lvf.conv_cls("hosvd"),
                  rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="lv.compressed_conv"):
    conv(jnp.ones((1, 5, 5, 3)))
  stateful = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0),
                      conv_general_dilated=lv.compressed_conv(method="asi"))
  with pytest.raises(TypeError, match="with_state"):
    stateful(jnp.ones((1, 5, 5, 3)))


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    dense = nn.Dense(4, dot_general_cls=lvf.dense_cls("hosvd",
                                                      on_overflow="ignore"))
    return dense(x), None


class _Scanned(nn.Module):
  axes: tuple = (("params", 0),)

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_ScanBlock, variable_axes=dict(self.axes),
                    split_rngs={"params": True}, length=3)
    return stack(name="layers")(x, None)[0]


def test_scan_without_the_collection_warns_and_with_it_keeps_stats():
  """Statistics vanished silently inside nn.scan (the controller saw none)."""
  x = jnp.ones((2, 4))
  dropped = _Scanned()
  variables = dropped.init(jax.random.key(0), x)
  with pytest.warns(lvf.StatsDroppedWarning, match="variable_axes"):
    _, state = dropped.apply(variables, x, mutable=["compression"])
  assert not lvf.collect_stats(state)
  kept = _Scanned(axes=(("params", 0), ("compression", 0)))
  with warnings.catch_warnings():
    warnings.simplefilter("error", lvf.StatsDroppedWarning)
    _, state = kept.apply(variables, x, mutable=["compression"])
    kept.apply(variables, x)     # not mutable: nothing asked, no warning
  stats = lvf.collect_stats(state)
  assert list(stats) == ["layers/Dense_0"]
  assert stats["layers/Dense_0"].needed_ranks.shape == (3, 2)


def test_init_sows_no_statistics_so_its_variables_cannot_grow_them():
  """init's "compression" merged into apply's variables grew every step."""
  layer = nn.Conv(4, (3, 3), conv_general_dilated_cls=lvf.conv_cls("hosvd"))
  x = jnp.ones((2, 5, 5, 3))
  # Jitted (op by op, the HOSVD compiled every operation on its own).
  variables = jax.jit(layer.init)(jax.random.key(0), x)
  assert "compression" not in variables
  apply = jax.jit(lambda v, x: layer.apply(v, x, mutable=["compression"]))
  for _ in range(2):   # each step from init's variables: one entry, always
    _, state = apply(variables, x)
    assert lvf.collect_stats(state)[""].needed_ranks.shape == (4,)
