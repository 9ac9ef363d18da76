"""lowrank_vjp.training.programs: the largest batch of the step that runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import lowrank_vjp as lv
from lowrank_vjp import training
from lowrank_vjp.training import programs


def test_largest_batch_searches_the_donated_step_that_runs(tiny):
  """Against a brute-force scan of the same donated step."""
  plan = tiny.plan(training.method_settings("hosvd", eps=0.9), k=2)
  trained, frozen = plan.split(tiny.variables)
  tx = optax.sgd(0.1)
  state = training.initial_state(trained, tx)
  step = training.make_train_step(tiny.model, plan, tx, 0, None)
  inputs = lambda b: (jax.ShapeDtypeStruct((b, 6, 6, 3), jnp.float32),
                      jax.ShapeDtypeStruct((b,), jnp.int32))
  probe = jax.jit(lambda s, f, x, y: step(s, f, x, y), donate_argnums=0)
  peaks = {b: lv.measure.xla_memory(probe, state, frozen, *inputs(b))
           for b in (2, 4, 6, 8)}
  assert all(m.alias_bytes > 0 for m in peaks.values())  # donated
  budget = (peaks[4].peak_bytes + peaks[6].peak_bytes) // 2
  found = programs.largest_batch(step, state, frozen, inputs, budget,
                                 start=2, tolerance=0)
  fits = [b for b, m in peaks.items() if m.peak_bytes <= budget]
  assert found.batch >= max(fits) and found.peak_bytes <= budget
  assert found.batch < 6
