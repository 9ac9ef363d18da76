"""The TDLRT schedule: which stages each step of a cycle runs."""

from __future__ import annotations

import pytest

from lowrank_vjp import tdlrt as lt

A, G, T = lt.AUGMENT, lt.GALERKIN, lt.TRUNCATE


def test_cycles_then_finetuning():
  cycle = lt.Cycle(adaptive_steps=7, local_steps=3, finetune_steps=2)
  assert cycle.total_steps == 9
  assert [cycle.actions(i) for i in range(9)] == [
      (A, G), (G,), (G, T),
      (A, G), (G,), (G, T),
      (A, G, T),          # the adaptive phase ends mid-cycle: truncate
      (G,), (G,)]


def test_one_local_step_is_the_papers_step():
  cycle = lt.Cycle(adaptive_steps=3, local_steps=1)
  assert [cycle.actions(i) for i in range(3)] == [(A, G, T)] * 3


def test_every_augment_is_truncated_before_the_next():
  for k in (1, 2, 4, 10):
    for n in (1, 5, 13):
      open_ = False
      cycle = lt.Cycle(adaptive_steps=n, local_steps=k, finetune_steps=2)
      for i in range(cycle.total_steps):
        acts = cycle.actions(i)
        assert G in acts
        if A in acts:
          assert not open_
          open_ = True
        if T in acts:
          assert open_
          open_ = False
      assert not open_


def test_errors():
  for bad in (dict(adaptive_steps=-1), dict(adaptive_steps=2, local_steps=0),
              dict(adaptive_steps=2, finetune_steps=-1),
              dict(adaptive_steps=2.0), dict(adaptive_steps=True)):
    with pytest.raises(ValueError):
      lt.Cycle(**bad)
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    lt.Cycle(adaptive_steps=2, finetune_steps=1).actions(3)
