"""lowrank_vjp.training.factorized: counting and freezing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_vjp import tdlrt as lt
from lowrank_vjp.training import factorized as fz


def _params():
  return {"conv": {"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.ones(8)},
          "head": {"kernel": jnp.ones((8, 2)), "bias": jnp.ones(2)}}


def test_matrix_rank_for_matches_the_count():
  r = fz.matrix_rank_for((3, 3, 32, 64), 10_000)
  m, o = 3 * 3 * 32, 64
  assert r == 26
  assert abs(r * r + r * (m + o) - 10_000) <= (2 * r + 1 + m + o)
  assert fz.matrix_rank_for((3, 3, 1, 2), 10**9) == 2   # at most min(m, o)


def test_param_stats_of_full_and_tucker_kernels():
  params = _params()
  full = fz.param_stats(params, ("conv",))
  assert full["params_kept"] == full["params_full"] == 288 + 8 + 16 + 2
  assert full["compression_rate"] == 0.0
  assert fz.ranks_of(params, ("conv",)) == {}
  tucker = fz.tuckerize(params, jax.random.key(0), ("conv",), (2, 2, 2, 2))
  assert isinstance(tucker["conv"]["kernel"], lt.TuckerWeight)
  assert tucker["head"] is not params["head"]          # a new tree
  stats = fz.param_stats(tucker, ("conv",))
  assert stats["params_kept"] < stats["params_full"] == full["params_full"]
  assert 0 < stats["factorized_kept_frac"] < 1
  ranks = fz.ranks_of(tucker, ("conv",))["conv"]
  assert len(ranks) == 4 and all(1 <= r <= 2 for r in ranks)
  # Adam keeps two entries per trained parameter; TDLRT only the cores'.
  assert (fz.optimizer_state_params(tucker, "tdlrt")
          < fz.optimizer_state_params(tucker, "tucker"))


def test_freeze_except_trains_only_the_listed_leaves():
  params = _params()
  tx = fz.freeze_except({("head", "kernel")}, optax.sgd(1.0))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates["head"]["kernel"]).sum()) > 0
  for layer, leaf in (("head", "bias"), ("conv", "kernel"), ("conv", "bias")):
    np.testing.assert_array_equal(updates[layer][leaf], 0.0)


def test_train_plain_raises_on_a_non_finite_loss():
  logged = []
  loss_fn = lambda p, batch: jnp.sum(p["w"]) * jnp.nan
  with pytest.raises(fz.NonFiniteLoss, match="at step 0"):
    fz.train_plain(loss_fn, {"w": jnp.ones(2)}, optax.sgd(0.1),
                   iter([None] * 3), 3, logged.append, "nan")
  assert logged == []
