"""The pieces of the TDLRT study: optimizer, split, ranks, statistics."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_vjp import tdlrt as lt
from lowrank_vjp._src.tensor import algebra
from lowrank_vjp.training import tdlrt_study as ts


def test_optimizer_clips_and_decays():
  tx = ts.optimizer(0.1, 10, weight_decay=0.0, clip=1.0)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  big = {"w": jnp.array([300.0, 400.0, 0.0])}
  small = {"w": 1e-3 * jnp.array([300.0, 400.0, 0.0])}
  # Adam's first step is lr · sign(g) whatever g's size; clipping changes
  # its moments, which the second step shows.
  u_big, s_big = tx.update(big, state, params)
  u_small, s_small = tx.update(small, state, params)
  np.testing.assert_allclose(u_big["w"], u_small["w"], rtol=1e-5)
  mu = s_big[1][0].mu["w"]
  np.testing.assert_allclose(jnp.linalg.norm(mu), 0.1 * 1.0, rtol=1e-5)
  # Cosine decay: the rate is zero after the schedule's 10 steps.
  for _ in range(10):
    u, state = tx.update(small, state, params)
  assert float(jnp.abs(u["w"]).max()) > 1e-4
  u, state = tx.update(small, state, params)
  np.testing.assert_allclose(u["w"], 0.0, atol=1e-7)


def test_validation_split_is_disjoint_and_complete():
  x = np.arange(23, dtype=np.float32)[:, None]
  y = np.arange(23)
  (xt, yt), (xv, yv) = ts.validation_split(x, y, every=5)
  assert len(yv) == 5 and len(yt) == 18
  assert sorted(np.concatenate([yt, yv])) == list(range(23))
  np.testing.assert_array_equal(xv[:, 0], yv)


def test_uniform_ranks_is_the_closest_fraction():
  shapes = {"a": (3, 3, 32, 64), "b": (3, 3, 64, 64)}
  target = 20_000
  got = ts.uniform_ranks(shapes, target)
  total = lambda r: sum(ts.tucker_params(shapes[n], r[n]) for n in shapes)
  brute = min((abs(total({n: (3, 3, max(1, round(f * s[2])),
                              max(1, round(f * s[3])))
                          for n, s in shapes.items()}) - target), f)
              for f in np.linspace(0, 1, 1001))
  assert abs(total(got) - target) == brute[0]
  assert all(r[:2] == (3, 3) for r in got.values())
  assert got["a"][2] / 32 == pytest.approx(got["b"][2] / 64, abs=0.02)


def test_condition_core_spreads_the_singular_values():
  w = jax.jit(lambda k: lt.random_tucker(k, (6, 7, 8), (4, 5, 6),
                                         init_ranks=(4, 5, 3)))(
      jax.random.key(0))
  c = ts.condition_core(w, 1000.0)
  s0 = np.linalg.svd(algebra.unfold(w.core, 1)[:5], compute_uv=False)
  s1 = np.linalg.svd(algebra.unfold(c.core, 1)[:5], compute_uv=False)
  s0, s1 = s0[s0 > 1e-6], s1[s1 > 1e-9]
  assert s1[0] / s1[-1] > 20 * s0[0] / s0[-1]
  np.testing.assert_array_equal(c.ranks(), w.ranks())   # masks kept
  np.testing.assert_array_equal(c.core[:, :, 3:], 0.0)


def test_select_and_tie():
  assert ts.select({0.1: [0.5, 0.7], 0.01: [0.9, 0.8]}) == 0.01
  assert ts.select({0.1: [0.5], 0.01: [0.5]}) == 0.01


def test_paired_interval_by_hand():
  d = ts.paired_interval([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
  half = 4.302652729911275 / math.sqrt(3)       # t(0.975, 2) · 1 / √3
  assert d["mean"] == pytest.approx(2.0)
  assert d["sd"] == pytest.approx(1.0)
  assert (d["low"], d["high"]) == pytest.approx((2 - half, 2 + half))
  assert d["n"] == 3 and d["wins"] == 3
  one = ts.paired_interval([1.0], [0.0])
  assert one["low"] == -math.inf and one["high"] == math.inf
  with pytest.raises(ValueError, match="equal"):
    ts.paired_interval([1.0, 2.0], [1.0])


def test_summarize_selects_on_validation_and_pairs_by_seed():
  runs = []
  for s in range(3):
    for lr, val, test in ((0.1, 0.9, 0.5), (0.01, 0.8, 0.9)):
      runs.append(dict(method="a", lr=lr, seed=s, val_accuracy=val,
                       test_accuracy=test + 0.01 * s, params_kept=10))
    runs.append(dict(method="tdlrt", lr=0.1, seed=s, val_accuracy=0.5,
                     test_accuracy=0.4, params_kept=10))
  out = ts.summarize(runs)
  assert out["a"]["lr"] == 0.1                  # best validation, not test
  np.testing.assert_allclose(out["a"]["test"], [0.5, 0.51, 0.52])
  assert out["a"]["minus_reference"]["mean"] == pytest.approx(0.11)
  assert "minus_reference" not in out["tdlrt"]
  text = ts.table(out)
  assert text.count("\n") == 3 and "+11.00" in text and "3/3" in text
