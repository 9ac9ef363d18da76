"""The offline tfds builders: Debian's Fashion-MNIST, scikit-learn's digits,
the Python standard library's sources as bytes.

Importing this module imports tensorflow-datasets (not TensorFlow); use the
builders through :func:`lowrank_vjp.training.data.load`, which imports it on
first use.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from lowrank_vjp.training import data, text


class DebianFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (MIT).

  ``SOURCE_DIR`` is where the package's IDX files are read from; a subclass
  can point it elsewhere (tests do).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "From /usr/share/datasets/fashion-mnist."}
  SOURCE_DIR = data.FASHION_MNIST_DIR

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Fashion-MNIST (Zalando), 60,000 train and 10,000 test "
                     "28x28 grey images in 10 classes, read from Debian's "
                     "dataset-fashion-mnist package."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(
                names=data.FASHION_MNIST_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if not data.available_fashion_mnist(self.SOURCE_DIR):
      raise FileNotFoundError(
          f"{self.SOURCE_DIR} has no Fashion-MNIST files; install Debian's "
          "package: apt-get install dataset-fashion-mnist")
    return {"train": self._generate_examples("train"),
            "test": self._generate_examples("t10k")}

  def _generate_examples(self, prefix):
    images = data.read_idx(os.path.join(self.SOURCE_DIR,
                                        f"{prefix}-images-idx3-ubyte.gz"))
    labels = data.read_idx(os.path.join(self.SOURCE_DIR,
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


class PythonStdlibText(tfds.core.GeneratorBasedBuilder):
  """The standard library's ``.py`` files as byte windows (see
  :mod:`lowrank_vjp.training.text`).

  One config per Python version (the corpus differs between them); the
  default is the running interpreter's. ``SOURCE_DIR`` is the library root
  read (None: :func:`~lowrank_vjp.training.text.stdlib_root`); a subclass
  can point it elsewhere (tests do).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Windows of 1,025 bytes every 1,024."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name=text.config_name(),
      description=f"The sources of Python {text.config_name()[2:]}'s "
      "standard library.")]
  SOURCE_DIR: str | None = None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=("The Python standard library's .py files (no "
                     "site-packages, tests, IDLE or lib2to3) as one byte "
                     "stream per split; a file is in validation when the "
                     "CRC-32 of its relative path is 0 mod 10."),
        features=tfds.features.FeaturesDict({
            "bytes": tfds.features.Tensor(shape=(text.CHUNK + 1,),
                                          dtype=np.uint8),
        }),
        homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split)
            for split in ("train", "validation")}

  def _generate_examples(self, split):
    stream = text.split_bytes(split, self.SOURCE_DIR)
    for i, window in enumerate(text.windows(stream)):
      yield i, {"bytes": window}


BUILDERS = {"debian_fashion_mnist": DebianFashionMnist,
            "sklearn_digits": SklearnDigits,
            "python_stdlib_text": PythonStdlibText}
"""Builder classes by dataset name (the names of ``data.BUILDER_NAMES``)."""
