"""lowrank_vjp.training.metrics: per-step figures and JSON lines."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import lowrank_vjp.flax as lvf
from lowrank_vjp import training


def _stats(method, **settings):
  conv = nn.Conv(8, (3, 3), conv_general_dilated_cls=lvf.conv_cls(
      method=method, **settings))
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
  # Jitted (op by op, the HOSVD compiled every operation on its own).
  variables = {"params": jax.jit(conv.init)(jax.random.key(1), x)["params"]}
  _, state = jax.jit(lambda v, x: conv.apply(v, x, mutable=["compression"]))(
      variables, x)
  return jax.device_get(lvf.collect_stats(state))


def test_stats_row_of_vanilla_and_hosvd():
  vanilla = training.stats_row(_stats("none"))
  want = 4 * 6 * 6 * 3 * 4 / 2**20
  assert vanilla["activation_memory_vanilla_mib"] == pytest.approx(want)
  assert vanilla["activation_memory_analytic_mib"] == pytest.approx(want)
  assert vanilla["overflow_layers"] == 0
  hosvd = training.stats_row(_stats("hosvd", eps=0.5,
                                    on_overflow="ignore"))
  assert hosvd["activation_memory_vanilla_mib"] == pytest.approx(want)
  assert 0 < hosvd["activation_memory_analytic_mib"] < want
  (ranks,) = hosvd["ranks"].values()
  assert len(ranks) == 4 and all(isinstance(r, int) for r in ranks)
  json.dumps(hosvd)  # a JSON line


def test_metrics_lines_round_trip(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  assert training.read_metrics(path, 10) == []
  rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
  training.write_metrics(path, rows[:2])
  with training.MetricsWriter(path) as writer:
    writer.write(rows[2])
    # Flushed: readable before the writer is closed.
    assert training.read_metrics(path, 10) == rows
  assert training.read_metrics(path, 2) == rows[:2]
  training.write_metrics(path, training.read_metrics(path, 1))
  assert training.read_metrics(path, 10) == rows[:1]


def test_check_finite():
  assert training.check_finite(1.5) == 1.5
  with pytest.raises(FloatingPointError, match="non-finite loss nan at step"):
    training.check_finite(float(jnp.nan), "at step 3")
