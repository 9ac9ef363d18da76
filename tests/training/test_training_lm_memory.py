"""lowrank_vjp.training.lm_memory: GPT whole-step peaks and their page."""

from __future__ import annotations

import lowrank_vjp as lv
from lowrank_vjp.training import lm_memory

SIZES = dict(seq=32, n_layer=1, n_head=2, n_embd=32, vocab=32)


def test_lean_step_peaks_below_vanilla_and_is_donated():
  step, args = lm_memory.make_step(lm_memory.ROWS["vanilla"], 8, **SIZES)
  vanilla = lv.measure.xla_memory(step, *args)
  assert vanilla.alias_bytes > 0                  # the state is donated
  lean = lm_memory.peak_bytes(lm_memory.ROWS["+ lv.flax.LayerNorm codes"],
                              8, **SIZES)
  assert lean < vanilla.peak_bytes


def test_the_page_is_computed_from_the_result():
  mib = int(lm_memory.MiB)
  env = {"date": "2026-01-01", "device": "cpu:cpu", "machine": "x86_64",
         "jax": "0", "flax": "0"}
  result = {"environment": env, "command": "python x.py",
            "sizes": {"n_layer": 4, "n_embd": 256, "n_head": 4, "seq": 128,
                      "vocab": 256},
            "peaks": [{"batch": 16, "peak_bytes": {"vanilla": 300 * mib,
                                                   "lean": 100 * mib}}],
            "max_batch": [{"budget_bytes": 1024 * mib,
                           "batch": {"vanilla": 40, "lean": 130},
                           "peak_bytes": {"vanilla": 1000 * mib,
                                          "lean": 1010 * mib}}]}
  text = lm_memory.page(result)
  assert "| lean | 100.0 | 3.00× |" in text
  assert "| configuration | peak MiB | vanilla / configuration |" in text
  assert "| lean | 130 | 1010.0 | 3.25× |" in text
  assert "no GPU was available" in text
