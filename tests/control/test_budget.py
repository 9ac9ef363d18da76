"""Budget mode: ranks fit the byte budget and spend it where error falls."""

import jax
import jax.numpy as jnp
import pytest

import lowrank_vjp as lv
from lowrank_vjp._src.control import budget as budget

KW = dict(window_strides=(1, 1), padding="SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _sample(key, low_rank):
  k1, k2, k3 = jax.random.split(key, 3)
  if low_rank:
    x = jnp.einsum("br,rhwc->bhwc", jax.random.normal(k1, (8, 2)),
                   jax.random.normal(k2, (2, 6, 6, 8)))
  else:
    x = jax.random.normal(k1, (8, 6, 6, 8))
  g = jax.random.normal(k3, (8, 6, 6, 4))
  return budget.LayerSample([x], [g], (3, 3, 8, 4), KW)


def test_plan_fits_budget_and_error_falls_with_budget(monkeypatch):
  samples = {"low": _sample(jax.random.PRNGKey(0), True),
             "high": _sample(jax.random.PRNGKey(1), False)}
  # A layer's options (its error and bytes at each ε) do not depend on the
  # budget: measure them once (op by op, about 2 s a call) and let every
  # budget below choose from the same ones.
  measured = {}
  real_options = budget._options

  def options_once(sample, eps_grid, method):
    key = (id(sample), tuple(eps_grid), repr(method))
    if key not in measured:
      measured[key] = real_options(sample, eps_grid, method)
    return measured[key]

  monkeypatch.setattr(budget, "_options", options_once)
  totals = []
  for budget_bytes in (20_000, 40_000, 200_000):
    caps, chosen = lv.plan_ranks(samples, budget_bytes)
    assert sum(o.nbytes for o in chosen.values()) <= budget_bytes
    assert set(caps) == {"low", "high"}
    totals.append(sum(o.error for o in chosen.values()))
  assert len(measured) == 2       # one measurement per layer
  assert totals[0] >= totals[1] >= totals[2]
  # The exactly rank-2 layer is served exactly at little cost (the plan at
  # 200 000 bytes, the loop's last).
  assert chosen["low"].error < 1e-5
  assert chosen["low"].ranks[0] <= 2


def test_budget_too_small_is_a_clear_error():
  samples = {"high": _sample(jax.random.PRNGKey(1), False)}
  with pytest.raises(ValueError, match="budget_bytes"):
    lv.plan_ranks(samples, 10)


def test_capacities_drive_layers_through_the_scope():
  import flax.linen as nn
  import lowrank_vjp.flax as lvf

  sample = _sample(jax.random.PRNGKey(1), False)
  caps, chosen = lv.plan_ranks({"high": sample}, 30_000)
  assert all(isinstance(r, int) for r in caps["high"])

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3, 3), padding="SAME", name="high",
                     conv_general_dilated_cls=lvf.conv_cls(
                         method="hosvd", eps=chosen["high"].eps,
                         on_overflow="ignore"))(x)

  x = sample.lhs[0]
  variables = Net().init(jax.random.key(0), x)

  def sown(capacities):
    with lv.rank_capacities(capacities):
      _, state = Net().apply(variables, x, mutable=["compression"])
    return lvf.collect_stats(state)["high"]

  planned = sown(caps)
  assert planned.capacity == caps["high"]             # the scope reached it
  assert planned.residual_nbytes == chosen["high"].nbytes
  assert sown(None).capacity != caps["high"]          # the default differs
