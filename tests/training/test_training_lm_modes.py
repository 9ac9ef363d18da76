"""lowrank_vjp.training.lm_modes: gradient error per compression setting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from lowrank_vjp import models
from lowrank_vjp.training import lm_modes

MODEL = models.GPT(vocab_size=32, block_size=8, n_layer=1, n_head=2,
                   n_embd=16, attention="jax", norm_method=None,
                   activation="jax")
TOKENS = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
TARGETS = jnp.roll(TOKENS, -1, axis=1)
# Jitted: at import (every xdist worker collects this module), op by op the
# initialisation compiled each of its operations on its own.
PARAMS = jax.jit(MODEL.init)(jax.random.key(1), TOKENS)["params"]


def test_exact_settings_have_no_error_and_full_residuals():
  grid = {"eps=1, all modes": {"method": "hosvd", "eps": 1.0,
                               "ranks": (lm_modes.FULL,) * 3},
          "vanilla": {"method": "none"}}
  rows = lm_modes.gradient_errors(MODEL, PARAMS, TOKENS, TARGETS, grid)
  for r in rows.values():
    assert r["max_error"] < 1e-4 and r["median_cosine"] > 0.9999
  assert rows["vanilla"]["residual_fraction"] == pytest.approx(1.0)


def test_more_eps_keeps_more_and_codes_keep_their_bits():
  grid = lm_modes.settings_grid()
  # Two ε of the grid, far apart (each setting is a compile of the model's
  # gradient; 0.99 ran the same code between them).
  keep = [f"hosvd eps={e}, all modes" for e in ("0.9", "0.999")]
  rows = lm_modes.gradient_errors(MODEL, PARAMS, TOKENS, TARGETS, {
      k: grid[k] for k in keep + ["quant 4-bit"]})
  for r in rows.values():
    assert 0 <= r["median_error"] <= r["max_error"] < 10
    # Tucker factors can outweigh a tiny activation: no upper bound of 1.
    assert 0 < r["residual_fraction"] < 3
  hosvd = [rows[k]["residual_fraction"] for k in keep]
  assert hosvd == sorted(hosvd)   # more ε keeps more
  assert {r["worst_layer"] for r in rows.values()} <= {
      "h_0/attn/c_attn", "h_0/attn/c_proj", "h_0/mlp/c_fc", "h_0/mlp/c_proj"}
  # Half a byte per float32 element, plus the scales.
  assert rows["quant 4-bit"]["residual_fraction"] == pytest.approx(0.125,
                                                                   rel=0.1)


def test_full_ranks_are_set_per_layer_shape():
  s = lm_modes.for_shape({"method": "hosvd", "ranks": (lm_modes.FULL, None,
                                                       lm_modes.FULL)},
                         (2, 8, 64))
  assert s["ranks"] == (2, None, 64)
  assert lm_modes.for_shape({"method": "quant"}, (2, 8, 64)) == {
      "method": "quant"}
