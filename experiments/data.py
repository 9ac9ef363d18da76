"""Image-classification data through tensorflow-datasets, without TensorFlow.

Two offline datasets come as tfds builders (``file_format="array_record"``,
``tfds.features.Tensor`` features, read back with ``as_data_source``, none of
which needs TensorFlow):

* ``debian_fashion_mnist``: Fashion-MNIST (70,000 28×28 grey images, 10
  classes) from Debian's ``dataset-fashion-mnist`` package
  (``apt-get install dataset-fashion-mnist``, files under
  ``/usr/share/datasets/fashion-mnist``).
* ``sklearn_digits``: scikit-learn's ``load_digits`` (1,797 8×8 grey
  images of handwritten digits, 10 classes), shipped inside scikit-learn.

Any other tfds dataset is used by name when its prepared data is already in
``data_dir`` (nothing is downloaded); with TensorFlow installed, datasets
prepared as TFRecord work too. :func:`load` returns a :class:`Split` per
split: random access, deterministic batches by step.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import sys
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress",
                         "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def _read_idx(path: str) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    raw = f.read()
  magic = int.from_bytes(raw[:4], "big")
  ndim = magic & 0xFF
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class DebianFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (MIT)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "From /usr/share/datasets/fashion-mnist."}
  SOURCE_DIR = FASHION_MNIST_DIR

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Fashion-MNIST (Zalando), 60,000 train and 10,000 test "
                     "28x28 grey images in 10 classes, read from Debian's "
                     "dataset-fashion-mnist package."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if not available_fashion_mnist(self.SOURCE_DIR):
      raise FileNotFoundError(
          f"{self.SOURCE_DIR} has no Fashion-MNIST files; install Debian's "
          "package: apt-get install dataset-fashion-mnist")
    return {"train": self._generate_examples("train"),
            "test": self._generate_examples("t10k")}

  def _generate_examples(self, prefix):
    images = _read_idx(os.path.join(self.SOURCE_DIR,
                                    f"{prefix}-images-idx3-ubyte.gz"))
    labels = _read_idx(os.path.join(self.SOURCE_DIR,
                                    f"{prefix}-labels-idx1-ubyte.gz"))
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield i, {"image": image[..., None], "label": int(label)}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits (UCI, 8×8, 16 grey levels → 0..255).

  Split deterministically: every fifth example (index ``% 5 == 0``) is in
  ``test`` (360), the rest in ``train`` (1,437).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sklearn.datasets.load_digits."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=("scikit-learn's copy of the UCI optical recognition of "
                     "handwritten digits test set: 1,797 8x8 images."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(False),
            "test": self._generate_examples(True)}

  def _generate_examples(self, test):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    pairs = zip(images, digits.target, strict=True)
    for i, (image, label) in enumerate(pairs):
      if (i % 5 == 0) == test:
        yield i, {"image": image[..., None], "label": int(label)}


BUILDERS = {"debian_fashion_mnist": DebianFashionMnist,
            "sklearn_digits": SklearnDigits}


def available_fashion_mnist(source_dir: str = FASHION_MNIST_DIR) -> bool:
  """Whether Debian's Fashion-MNIST files are installed."""
  return all(os.path.isfile(os.path.join(source_dir, f"{p}-{k}-idx"
                                         f"{3 if k == 'images' else 1}"
                                         "-ubyte.gz"))
             for p in ("train", "t10k") for k in ("images", "labels"))


def default_dataset(log=print) -> str:
  """``debian_fashion_mnist`` when installed, else ``sklearn_digits``."""
  if available_fashion_mnist():
    return "debian_fashion_mnist"
  log(f"Debian's Fashion-MNIST is not installed ({FASHION_MNIST_DIR}; "
      "`apt-get install dataset-fashion-mnist` on Debian/Ubuntu): falling "
      "back to scikit-learn's digits (sklearn_digits).")
  return "sklearn_digits"


@dataclasses.dataclass
class Split:
  """One split: random access to ``(image, label)`` examples.

  Attributes:
    source: A sequence of examples (``__len__``, ``__getitem__``), e.g. a
      tfds ``ArrayRecordDataSource``.
    image_key: Feature holding the image (``[H, W]`` or ``[H, W, C]``).
    label_key: Feature holding the integer label.
    num_classes: Number of classes.
  """

  source: Sequence
  image_key: str
  label_key: str
  num_classes: int

  def __len__(self) -> int:
    return len(self.source)

  def get(self, indices: Sequence[int], image_size: int | None = None):
    """Examples at ``indices`` as ``(uint8[N, S, S, C], int32[N])``.

    Images of other sizes are resized (bilinear) to ``image_size`` on the
    host; grey images keep one channel (the model input replicates it).
    """
    idx = [int(i) for i in indices]
    try:
      examples = self.source.__getitems__(idx)
    except (AttributeError, TypeError):  # plain sequences; tfds's mocks
      examples = [self.source[i] for i in idx]
    images, labels = [], []
    for ex in examples:
      image = np.asarray(ex[self.image_key])
      if image.ndim == 2:
        image = image[..., None]
      if image_size is not None and image.shape[:2] != (image_size,
                                                        image_size):
        image = _resize(image, image_size)
      images.append(image)
      labels.append(int(ex[self.label_key]))
    channels = {im.shape[-1] for im in images}
    if channels == {1, 3}:
      images = [np.repeat(im, 3, -1) if im.shape[-1] == 1 else im
                for im in images]
    return np.stack(images).astype(np.uint8), np.asarray(labels, np.int32)

  def batch_indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of batch ``step``: epochs of seeded permutations.

    A pure function of ``(step, batch_size, seed)``, so a resumed run reads
    exactly the batches the uninterrupted run would have.
    """
    n = len(self)
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[pos * batch_size:(pos + 1) * batch_size]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.shape[-1] == 1:
    out = Image.fromarray(image[..., 0]).resize((size, size),
                                                Image.Resampling.BILINEAR)
    return np.asarray(out)[..., None]
  out = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(out)


def _keys(info) -> tuple[str, str]:
  if info.supervised_keys and len(info.supervised_keys) == 2:
    image_key, label_key = info.supervised_keys
    if isinstance(image_key, str) and isinstance(label_key, str):
      return image_key, label_key
  names = list(info.features.keys())
  if "image" in names and "label" in names:
    return "image", "label"
  raise ValueError(f"cannot tell the image and label features apart in "
                   f"{names}; the dataset needs supervised_keys")


def builder(name: str, data_dir: str | None = None):
  """The tfds builder for ``name`` (one of :data:`BUILDERS`, or any tfds name).

  The builders here are prepared on first use (offline); any other dataset
  must already be prepared in ``data_dir`` (nothing is downloaded).
  """
  if name in BUILDERS:
    b = BUILDERS[name](data_dir=data_dir, file_format="array_record")
    if not b.is_prepared():
      b.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return b
  b = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  return b


def load(name: str, data_dir: str | None = None,
         splits: Sequence[str] = ("train", "test")) -> dict[str, Split]:
  """Loads ``splits`` of dataset ``name`` for random access.

  Args:
    name: ``"debian_fashion_mnist"``, ``"sklearn_digits"`` or any tfds name
      whose data is present in ``data_dir``.
    data_dir: tfds data directory (tfds's default when None).
    splits: Split names; ``"test"`` falls back to ``"validation"``.

  Returns:
    ``{split: Split}``.

  Raises:
    FileNotFoundError: when the data is not present (tfds would download
      it; this never does).
  """
  b = builder(name, data_dir)
  image_key, label_key = _keys(b.info)
  label = b.info.features[label_key]
  num_classes = int(getattr(label, "num_classes", 0) or 0)
  out = {}
  for split in splits:
    candidates = [split] + (["validation", "val"] if split == "test" else [])
    source, error = None, None
    for key in candidates:
      try:
        source = b.as_data_source(split=key)
        break
      except Exception as e:  # pylint: disable=broad-except
        error = error or e
    if source is None:
      if name not in BUILDERS and not b.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in "
            f"{data_dir or tfds.core.constants.DATA_DIR!r}; this script never "
            "downloads. Prepare it there first (file_format='array_record' "
            "reads without TensorFlow).") from error
      source = _numpy_source(b, split, error)
    out[split] = Split(source, image_key, label_key, num_classes)
  return out


def _numpy_source(b, split, error):
  """A whole split as a list of numpy examples, read through TensorFlow."""
  if "tensorflow" not in sys.modules:
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise FileNotFoundError(
          f"{b.name}/{split} cannot be read without TensorFlow ({error!r}); "
          "install tensorflow or prepare it with file_format='array_record'"
      ) from error
  return list(tfds.as_numpy(b.as_dataset(split=split)))
