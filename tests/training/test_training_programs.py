"""lowrank_vjp.training.programs: the compiled programs of a run, and the
largest batch of the step that runs."""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


def test_programs_release_the_least_recently_used():
  @functools.partial(jax.jit, static_argnames="capacities")
  def step(x, capacities=None):
    return x * (1.0 if capacities is None else float(capacities))

  programs = training.Programs(step, jnp.ones(3), max_programs=2)
  first = programs(None)
  programs(2)
  assert programs(None) is first                 # held: no compile
  programs(3)                                     # releases 2, not None
  assert (programs.held, len(programs), programs.compiles) == (2, 3, 3)
  assert programs(None) is first
  before = programs.compile_s[2]
  np.testing.assert_array_equal(programs(2)(jnp.ones(3)), 2.0)
  assert programs.compiles == 4 and programs.compile_s[2] > before
  assert programs.held == 2 and len(programs) == 3
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match="max_programs"):
      training.Programs(step, jnp.ones(3), max_programs=bad)


def _blocking_step(gate):
  """A step whose trace at ``capacities=2`` waits for ``gate``."""

  @functools.partial(jax.jit, static_argnames="capacities")
  def step(x, capacities=None):
    if capacities == 2:
      gate.wait()
    if capacities == "bad":
      raise ValueError("no such setting")
    return x * (1.0 if capacities in (None, "bad") else float(capacities))

  return step


def test_prefetch_compiles_in_the_background_once():
  gate = threading.Event()
  programs = training.Programs(_blocking_step(gate), jnp.ones(3))
  programs(None)
  waited = programs.wait_s
  programs.prefetch(2)                # its trace blocks until the gate opens
  programs.prefetch(2)                # already compiling: ignored
  programs.prefetch(None)             # already compiled: ignored
  assert programs.prefetched == {2}
  # A setting queued behind the blocked compile is compiled by its caller
  # at once, not after the queue.
  safety = threading.Timer(60, gate.set)
  safety.start()
  programs.prefetch(5)
  np.testing.assert_array_equal(programs(5)(jnp.ones(3)), 5.0)
  assert not gate.is_set() and programs.compiles == 2
  gate.set()
  safety.cancel()
  np.testing.assert_array_equal(programs(2)(jnp.ones(3)), 2.0)  # waits
  assert programs.compiles == 3 and len(programs) == 3   # each once
  assert programs.wait_s > waited and programs.prefetch_used == {2, 5}
  # A prefetch that finished in time costs the step nothing.
  programs.prefetch(3)
  programs.close()
  waited = programs.wait_s
  np.testing.assert_array_equal(programs(3)(jnp.ones(3)), 3.0)
  assert programs.wait_s == waited and programs.compiles == 4
  # A failed background compile surfaces when its setting is called.
  programs.prefetch("bad")
  programs.close()
  with pytest.raises(ValueError, match="no such setting"):
    programs("bad")
