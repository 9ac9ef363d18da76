"""Image-classification data through tensorflow-datasets, without TensorFlow.

Two offline datasets come as tfds builders
(:mod:`lowrank_vjp.training.tfds_builders`: ``file_format="array_record"``,
``tfds.features.Tensor`` features, read back with ``as_data_source``, none of
which needs TensorFlow):

* ``debian_fashion_mnist``: Fashion-MNIST (70,000 28×28 grey images, 10
  classes) from Debian's ``dataset-fashion-mnist`` package
  (``apt-get install dataset-fashion-mnist``, files under
  ``/usr/share/datasets/fashion-mnist``).
* ``sklearn_digits``: scikit-learn's ``load_digits`` (1,797 8×8 grey
  images of handwritten digits, 10 classes), shipped inside scikit-learn.

A third, ``python_stdlib_text`` (the standard library's Python sources as
bytes, for language models), is read by :func:`lowrank_vjp.training.text.load`.

Any other tfds dataset is used by name when its prepared data is already in
``data_dir`` (nothing is downloaded); with TensorFlow installed, datasets
prepared as TFRecord work too. :func:`load` returns a :class:`Split` per
split: random access, deterministic batches by step.

tensorflow-datasets is imported on first use (by :func:`builder` and
:func:`load`), not with this module.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs its files."""

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress",
                         "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")

BUILDER_NAMES = ("debian_fashion_mnist", "sklearn_digits",
                 "python_stdlib_text")
"""The offline builders of :mod:`lowrank_vjp.training.tfds_builders`."""


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped IDX file (the MNIST format) as a ``uint8`` array.

  Args:
    path: A ``*-idx{1,3}-ubyte.gz`` file.

  Returns:
    The array, e.g. ``uint8[N, 28, 28]`` for images, ``uint8[N]`` for labels.
  """
  with gzip.open(path, "rb") as f:
    raw = f.read()
  magic = int.from_bytes(raw[:4], "big")
  ndim = magic & 0xFF
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def available_fashion_mnist(source_dir: str = FASHION_MNIST_DIR) -> bool:
  """Whether Debian's Fashion-MNIST files are installed in ``source_dir``."""
  return all(os.path.isfile(os.path.join(source_dir, f"{p}-{k}-idx"
                                         f"{3 if k == 'images' else 1}"
                                         "-ubyte.gz"))
             for p in ("train", "t10k") for k in ("images", "labels"))


def default_dataset(log: Callable[[str], object] = print) -> str:
  """``debian_fashion_mnist`` when installed, else ``sklearn_digits``.

  Args:
    log: Called with a message when it falls back to scikit-learn's digits.

  Returns:
    The dataset name, for :func:`load`.
  """
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

  Example:
    >>> split = Split([{"image": np.zeros((8, 8), np.uint8), "label": 3}],
    ...               "image", "label", 10)
    >>> images, labels = split.get([0], image_size=16)
    >>> images.shape, labels.tolist()
    ((1, 16, 16, 1), [3])
  """

  source: Sequence
  image_key: str
  label_key: str
  num_classes: int

  def __len__(self) -> int:
    return len(self.source)

  def get(self, indices: Sequence[int],
          image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
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
        image = resize(image, image_size)
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
    return epoch_indices(len(self), step, batch_size, seed)


def epoch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Indices of batch ``step`` of ``n`` examples: epochs of seeded
  permutations, a pure function of its arguments.

  Example:
    >>> sorted(np.concatenate([epoch_indices(6, s, 3, 0) for s in (0, 1)]))
    [0, 1, 2, 3, 4, 5]
  """
  per_epoch = max(1, n // batch_size)
  epoch, pos = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[pos * batch_size:(pos + 1) * batch_size]


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of ``uint8[H, W, C]`` (C: 1 or 3) to ``[size, size, C]``.
  """
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
  """The tfds builder for ``name`` (one of :data:`BUILDER_NAMES`, or any tfds
  name).

  The offline builders are prepared on first use; any other dataset must
  already be prepared in ``data_dir`` (nothing is downloaded).

  Args:
    name: The dataset name.
    data_dir: tfds data directory (tfds's default when None).

  Returns:
    A ``tfds.core.DatasetBuilder``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if name in BUILDER_NAMES:
    from lowrank_vjp.training import tfds_builders  # pylint: disable=g-import-not-at-top
    b = tfds_builders.BUILDERS[name](data_dir=data_dir,
                                     file_format="array_record")
    if not b.is_prepared():
      b.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return b
  return tfds.builder(name, data_dir=data_dir, try_gcs=False)


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

  Example:
    >>> splits = load("sklearn_digits", "/tmp/tfds")  # doctest: +SKIP
    >>> images, labels = splits["train"].get([0, 1], image_size=32)
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
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
      if name not in BUILDER_NAMES and not b.is_prepared():
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
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if "tensorflow" not in sys.modules:
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise FileNotFoundError(
          f"{b.name}/{split} cannot be read without TensorFlow ({error!r}); "
          "install tensorflow or prepare it with file_format='array_record'"
      ) from error
  return list(tfds.as_numpy(b.as_dataset(split=split)))


# ------------------------------------------------------ in-memory digits ---


def load_digits_split():
  """scikit-learn's digits as standardised arrays, every fifth one for test.

  Returns:
    ``((x_train, y_train), (x_test, y_test))``: ``float32[N, 8, 8, 1]``
    images standardised with the training mean and deviation, ``int32[N]``
    labels; 1,437 train and 360 test examples.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  x = (d.images.astype(np.float32) / 16.0)[..., None]
  y = d.target.astype(np.int32)
  test = np.arange(len(x)) % 5 == 0
  mean, std = x[~test].mean(), x[~test].std()
  x = (x - mean) / std
  return (x[~test], y[~test]), (x[test], y[test])


def load_fashion_mnist_arrays(train_examples: int | None = None,
                              test_examples: int | None = None,
                              source_dir: str = FASHION_MNIST_DIR):
  """Debian's Fashion-MNIST as standardised in-memory arrays.

  Args:
    train_examples: Keep the first this many training images (None: all
      60,000).
    test_examples: Keep the first this many test images (None: all 10,000).
    source_dir: Where ``dataset-fashion-mnist`` installed its files.

  Returns:
    ``((x_train, y_train), (x_test, y_test))``: ``float32[N, 28, 28, 1]``
    images standardised with the kept training images' mean and deviation,
    ``int32[N]`` labels.

  Raises:
    FileNotFoundError: when the package is not installed.
  """
  if not available_fashion_mnist(source_dir):
    raise FileNotFoundError(
        f"Fashion-MNIST is not installed in {source_dir!r} "
        "(`apt-get install dataset-fashion-mnist`).")
  read = lambda prefix, kind: read_idx(
      os.path.join(source_dir, f"{prefix}-{kind}-idx"
                   f"{3 if kind == 'images' else 1}-ubyte.gz"))
  xtr = read("train", "images")[:train_examples].astype(np.float32) / 255
  ytr = read("train", "labels")[:train_examples].astype(np.int32)
  xte = read("t10k", "images")[:test_examples].astype(np.float32) / 255
  yte = read("t10k", "labels")[:test_examples].astype(np.int32)
  mean, std = xtr.mean(), xtr.std()
  norm = lambda x: ((x - mean) / std)[..., None]
  return (norm(xtr), ytr), (norm(xte), yte)


def epoch_batches(x: np.ndarray, y: np.ndarray, batch: int,
                  seed: int) -> Iterator[tuple]:
  """Endless shuffled batches of in-memory arrays, epoch by epoch.

  Args:
    x: Inputs ``[N, ...]``.
    y: Labels ``[N]``.
    batch: Batch size; the last incomplete batch of each epoch is dropped.
    seed: Seed of the ``np.random.RandomState`` drawing the permutations.

  Yields:
    ``(jax.Array[batch, ...], jax.Array[batch])``.
  """
  rng = np.random.RandomState(seed)
  while True:
    perm = rng.permutation(len(x))
    for i in range(0, len(x) - batch + 1, batch):
      j = perm[i:i + batch]
      yield jnp.asarray(x[j]), jnp.asarray(y[j])
