"""lowrank_vjp.training.segmentation: digit canvases and their scores."""

from __future__ import annotations

import jax
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


def test_optimizer_scales_the_encoders_rate_only():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = {"params": {"encoder": {"w": jnp.zeros(3)},
                       "decoder": {"lateral0": {"w": jnp.zeros(3)}}}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = seg.optimizer(1e-2, 10, encoder_lr_scale=0.1)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves every coordinate by its rate (g / |g| = 1).
  np.testing.assert_allclose(updates["params"]["encoder"]["w"], -1e-3,
                             rtol=1e-4)
  np.testing.assert_allclose(updates["params"]["decoder"]["lateral0"]["w"],
                             -1e-2, rtol=1e-4)
  same = seg.optimizer(1e-2, 10)
  updates, _ = same.update(grads, same.init(params), params)
  np.testing.assert_allclose(updates["params"]["encoder"]["w"], -1e-2,
                             rtol=1e-4)
  with pytest.raises(ValueError, match="encoder_lr_scale=0"):
    seg.optimizer(1e-2, 10, encoder_lr_scale=0)


def test_decoder_refines_at_the_input_resolution():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  features = [jnp.ones((2, 8 // s, 8 // s, 4)) for s in (1, 2, 4, 8)]
  image = jnp.linspace(0, 1, 2 * 32 * 32 * 3).reshape(2, 32, 32, 3)
  decoder = seg.Decoder(num_classes=5, width=8)
  variables = decoder.init(jax.random.key(0), features, image)
  logits = decoder.apply(variables, features, image)
  assert logits.shape == (2, 32, 32, 5)
  assert variables["params"]["refine"]["kernel"].shape == (3, 3, 5 + 3, 16)
  # The refinement reads the image: changing it changes the logits, while
  # the features (constant) are unchanged.
  other = decoder.apply(variables, features, image[:, ::-1])
  assert not np.allclose(logits, other)


def test_table_has_a_row_per_run():
  report = {"run": "vanilla", "mean_iou": 0.5, "pixel_accuracy": 0.9,
            "activation_memory_analytic_peak_mib": 1.0,
            "activation_memory_vanilla_mib": 1.0, "xla_peak_mib": 10.0,
            "step_time_median_s": 0.2, "compile_time_s": 3.0, "compiles": 1,
            "steps_below_eps": 0}
  lines = seg.table([report, dict(report, run="hosvd", compiles=4,
                                  step_time_median_s=0.3)]).splitlines()
  assert len(lines) == 4
  assert lines[2].startswith("| vanilla | 50.00 | 90.00 |")
  assert "| 1.00 |" in lines[2] and "| 1.50 |" in lines[3]
  assert lines[2].endswith("| 1 | 0 |") and lines[3].endswith("| 4 | 0 |")
