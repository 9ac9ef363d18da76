"""lowrank_vjp.training.segmentation: digit canvases and their scores."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_vjp.training import data
from lowrank_vjp.training import segmentation as seg


@pytest.fixture(scope="module")
def digits():
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (8, 8), dtype=np.uint8),
               "label": i % 10} for i in range(20)]
  return data.Split(examples, "image", "label", 10)


def test_canvases_are_a_function_of_seed_and_index(digits):
  a = seg.DigitCanvases(digits, 48, seed=3, length=5)
  b = seg.DigitCanvases(digits, 48, seed=3, length=5)
  c = seg.DigitCanvases(digits, 48, seed=4, length=5)
  images, labels = a.batch([0, 1, 2])
  assert images.shape == (3, 48, 48, 1) and images.dtype == np.uint8
  assert labels.shape == (3, 48, 48) and labels.dtype == np.int32
  again = b.batch([0, 1, 2])
  np.testing.assert_array_equal(images, again[0])
  np.testing.assert_array_equal(labels, again[1])
  assert not np.array_equal(labels, c.batch([0, 1, 2])[1])
  assert len(a) == 5


def test_labels_mark_the_ink(digits):
  image, label = seg.DigitCanvases(digits, 40, seed=0, length=1).example(0)
  assert set(np.unique(label)) <= set(range(seg.NUM_CLASSES))
  assert (label > 0).any() and (label == 0).any()
  assert (image[..., 0][label == 0] == 0).all()   # background stays black


def test_scores():
  cm = np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]])
  pixel, miou = seg.scores(cm)
  assert pixel == pytest.approx(7 / 8)
  assert miou == pytest.approx((3 / 4 + 4 / 5) / 2)  # class 2 is absent
