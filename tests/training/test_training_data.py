"""lowrank_vjp.training.data and .tfds_builders: tfds input without
TensorFlow, the offline builders and mocked datasets."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("importlib_resources")

from lowrank_vjp.training import data as data_lib  # noqa: E402
from lowrank_vjp.training import tfds_builders  # noqa: E402


def test_sklearn_digits_builder(tmp_path):
  pytest.importorskip("sklearn")
  splits = data_lib.load("sklearn_digits", str(tmp_path))
  train, test = splits["train"], splits["test"]
  assert (len(train), len(test)) == (1437, 360)
  assert train.num_classes == 10
  images, labels = train.get(np.arange(50))
  assert images.shape == (50, 8, 8, 1) and images.dtype == np.uint8
  assert images.max() == 255 and set(labels) <= set(range(10))
  resized, _ = test.get([0, 1], image_size=32)
  assert resized.shape == (2, 32, 32, 1)
  # Prepared once: a second load reads the same records.
  again, _ = data_lib.load("sklearn_digits", str(tmp_path))["train"].get(
      np.arange(50))
  np.testing.assert_array_equal(again, images)


def _write_idx(path, array):
  dims = array.shape
  header = bytes([0, 0, 8, len(dims)]) + b"".join(
      d.to_bytes(4, "big") for d in dims)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_builder_reads_debian_files(tmp_path):
  """The builder on files laid out as Debian's package lays them out."""
  src = tmp_path / "fashion-mnist"
  src.mkdir()
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 12), ("t10k", 5)):
    _write_idx(src / f"{prefix}-images-idx3-ubyte.gz",
               rng.integers(0, 256, (n, 28, 28)))
    _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz",
               rng.integers(0, 10, (n,)))

  class Local(tfds_builders.DebianFashionMnist):
    SOURCE_DIR = str(src)

  builder = Local(data_dir=str(tmp_path / "tfds"),
                  file_format="array_record")
  builder.download_and_prepare()
  sources = {s: builder.as_data_source(split=s) for s in ("train", "test")}
  assert len(sources["train"]) == 12 and len(sources["test"]) == 5
  images = data_lib.read_idx(str(src / "train-images-idx3-ubyte.gz"))
  labels = data_lib.read_idx(str(src / "train-labels-idx1-ubyte.gz"))
  split = data_lib.Split(sources["train"], "image", "label", 10)
  got, got_labels = split.get(np.arange(12))
  order = [int(np.flatnonzero((images == g[..., 0]).all((1, 2)))[0])
           for g in got]
  np.testing.assert_array_equal(got_labels, labels[order])


def test_fashion_mnist_missing_falls_back(monkeypatch):
  monkeypatch.setattr(data_lib, "available_fashion_mnist", lambda *a: False)
  said = []
  assert data_lib.default_dataset(log=said.append) == "sklearn_digits"
  assert "falling back" in said[0] and "dataset-fashion-mnist" in said[0]


@pytest.mark.skipif(not data_lib.available_fashion_mnist(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_files():
  images = data_lib.read_idx(os.path.join(
      data_lib.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
  labels = data_lib.read_idx(os.path.join(
      data_lib.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
  assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
  assert np.bincount(labels).tolist() == [1000] * 10


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)),
                                        ("cifar10", (32, 32, 3))])
def test_any_tfds_dataset_by_name_mocked(tmp_path, name, shape):
  with tfds.testing.mock_data(num_examples=6):
    splits = data_lib.load(name, str(tmp_path))
    train = splits["train"]
    assert len(train) == 6 and train.num_classes == 10
    images, labels = train.get([0, 5, 3])
    assert images.shape == (3,) + shape and images.dtype == np.uint8
    assert labels.dtype == np.int32
    resized, _ = splits["test"].get([1, 2], image_size=16)
    assert resized.shape == (2, 16, 16, shape[-1])


def test_absent_dataset_is_not_downloaded(tmp_path):
  with pytest.raises(FileNotFoundError, match="never downloads"):
    data_lib.load("mnist", str(tmp_path))


def test_batches_are_a_function_of_the_step():
  split = data_lib.Split(list(range(103)), "image", "label", 10)
  a = [split.batch_indices(s, 10, seed=3) for s in range(25)]
  b = [split.batch_indices(s, 10, seed=3) for s in range(25)]
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  epoch0 = np.concatenate(a[:10])
  assert len(set(epoch0.tolist())) == 100  # no repeats within an epoch
  assert not np.array_equal(a[0], a[10])  # a new permutation per epoch


def test_builder_names_match_the_builders():
  assert tuple(tfds_builders.BUILDERS) == data_lib.BUILDER_NAMES


def test_grey_and_colour_images_are_stacked_as_colour():
  grey = {"image": np.full((4, 4), 7, np.uint8), "label": 1}
  colour = {"image": np.zeros((4, 4, 3), np.uint8), "label": 2}
  images, labels = data_lib.Split([grey, colour], "image", "label",
                                  3).get([0, 1])
  assert images.shape == (2, 4, 4, 3) and labels.tolist() == [1, 2]
  assert (images[0] == 7).all()


def test_digits_arrays_and_epoch_batches():
  pytest.importorskip("sklearn")
  (x, y), (xt, yt) = data_lib.load_digits_split()
  assert x.shape == (1437, 8, 8, 1) and xt.shape == (360, 8, 8, 1)
  assert x.dtype == np.float32 and y.dtype == np.int32
  assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-4
  it = data_lib.epoch_batches(x, y, 100, seed=0)
  first = [next(it) for _ in range(15)]   # 14 batches per epoch
  assert all(b[0].shape == (100, 8, 8, 1) for b in first)
  again = next(data_lib.epoch_batches(x, y, 100, seed=0))
  np.testing.assert_array_equal(np.asarray(again[1]),
                                np.asarray(first[0][1]))


def test_fashion_mnist_arrays_standardised_and_cut(tmp_path):
  src = tmp_path / "fashion-mnist"
  src.mkdir()
  rng = np.random.default_rng(1)
  raw = {}
  for prefix, n in (("train", 12), ("t10k", 5)):
    raw[prefix] = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, (n,))
    _write_idx(src / f"{prefix}-images-idx3-ubyte.gz", raw[prefix][0])
    _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", raw[prefix][1])
  (x, y), (xt, yt) = data_lib.load_fashion_mnist_arrays(
      train_examples=10, test_examples=4, source_dir=str(src))
  assert x.shape == (10, 28, 28, 1) and xt.shape == (4, 28, 28, 1)
  assert x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(y, raw["train"][1][:10])
  np.testing.assert_array_equal(yt, raw["t10k"][1][:4])
  assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-5
  # The test images use the training images' statistics.
  train = raw["train"][0][:10] / 255.0
  np.testing.assert_allclose(
      xt[..., 0], (raw["t10k"][0][:4] / 255.0 - train.mean()) / train.std(),
      rtol=1e-4, atol=1e-5)
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    data_lib.load_fashion_mnist_arrays(source_dir=str(tmp_path / "none"))
