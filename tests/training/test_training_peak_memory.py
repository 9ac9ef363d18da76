"""lowrank_vjp.training.peak_memory: whole-step peaks and their page."""

from __future__ import annotations

import jax
import pytest

import lowrank_vjp as lv
import lowrank_vjp.rules as lvr
from lowrank_vjp.training import peak_memory as pm

TINY = pm.Setting("cnn", "all", 8)


def test_steps_are_built_donated_and_compressed():
  step, args = pm.make_step(TINY, "hosvd", 4)
  m = lv.measure.xla_memory(step, *args)
  assert m.alias_bytes > 0                      # the state is donated
  vanilla = pm.peak_bytes(TINY, "vanilla", 4)
  assert m.peak_bytes < vanilla


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_setting_in_mixed_precision_builds_the_mixed_precision_step(dtype):
  setting = pm.Setting("cnn", "all", 8, dtype=dtype)
  assert setting.label().endswith(dtype)
  step, args = pm.make_step(setting, "hosvd", 2)
  assert ("loss_scale" in args[0]) is (dtype == "float16")
  stats = jax.eval_shape(step, *args)[1]["stats"]
  assert stats and all(s.itemsize == 2 for s in stats.values())


def test_remat_variant_and_unknown_names():
  jaxprs = {n: str(jax.make_jaxpr(step)(*args)) for n, (step, args) in
            ((n, pm.make_step(TINY, n, 2)) for n in ("hosvd", pm.REMAT))}
  # Traced, not compiled: the remat'd blocks recompute their forward pass
  # in the backward one, around the named residuals.
  assert lv.RESIDUAL_NAME in jaxprs[pm.REMAT]
  assert len(jaxprs[pm.REMAT]) > len(jaxprs["hosvd"])
  with pytest.raises(ValueError, match="unknown method 'hosvd2'"):
    pm.make_step(TINY, "hosvd2", 2)
  with pytest.raises(ValueError, match="cnn only"):
    pm.make_step(pm.Setting("resnet18", "4", 32), pm.REMAT, 2)


def _result(partial=False):
  env = {"date": "2026-01-01", "device": "cpu:cpu", "machine": "x86_64",
         "jax": "0", "flax": "0", "python": "3"}
  mib = int(pm.MiB)
  return {
      "environment": env, "command": "python experiments/peak_memory.py",
      "wall_s": 120.0, "partial": partial,
      "peaks": [{"setting": "cnn", "batch": 64,
                 "peak_bytes": {"vanilla": 300 * mib, "hosvd": 100 * mib}}],
      "max_batch": [{"setting": "cnn", "budget_bytes": 512 * mib,
                     "tolerance": 0.1,
                     "batch": {"vanilla": 40, "hosvd": 130},
                     "peak_bytes": {"vanilla": 500 * mib, "hosvd": 510 * mib},
                     "compiles": {"vanilla": 7, "hosvd": 9}}],
      "curve": {"setting": "cnn", "batches": [16, 32],
                "peak_bytes": {"vanilla": {"16": 80 * mib, "32": 150 * mib},
                               "hosvd": {"16": 30 * mib, "32": 55 * mib}}},
  }


@pytest.mark.parametrize("partial", [False, True])
def test_the_page_is_computed_from_the_result(partial):
  text = pm.page(_result(partial))
  assert "| hosvd | 100.0 | 3.00× |" in text       # 300 / 100
  assert "| hosvd | 130 | 510.0 | 3.25× | 9 |" in text   # 130 / 40
  assert "Largest batch under 512 MiB" in text
  assert "within 10%" in text
  assert "| vanilla | 80 | 150 |" in text
  assert ("**Partial" in text) == partial
  assert "no GPU was available" in text


def test_a_tables_note_is_printed_under_that_table_only():
  result = _result()
  result["max_batch"][0]["note"] = "Kept from older code."
  text = pm.page(result)
  assert text.count("**Kept from older code.**") == 1
  below = text.split("## Largest batch under 512 MiB")[1]
  assert "**Kept from older code.**" in below.split("## Peak against")[0]
  assert "Kept from" not in text.split("## Largest batch")[0]


def test_trained_batchnorms_keep_codes_under_a_compressing_method(
    monkeypatch):
  setting = pm.Setting("resnet18", "all", 32, train_bn=True)
  assert "BN trained" in setting.label()

  def named_residuals():
    step, args = pm.make_step(setting, "hosvd", 2)
    return str(jax.make_jaxpr(step)(*args)).count(lv.RESIDUAL_NAME)

  ours = named_residuals()
  monkeypatch.setattr(lvr.Rule, "batch_norm_method",
                      lambda self: (False, None))   # Flax's own BatchNorm
  # Each of ResNet18's 20 BatchNorms (stem, 2 per block, 3 downsamples)
  # names its residual: 3 arrays of codes, the mean, 1/σ and the scale.
  assert ours - named_residuals() == 20 * 6
