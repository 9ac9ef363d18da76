"""lowrank_vjp.training.checkpoint: Orbax save/restore and the controller."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_vjp as lv
from lowrank_vjp import training

pytest.importorskip("orbax.checkpoint")


def _state(step):
  return {"step": jnp.asarray(step, jnp.int32),
          "params": {"w": jnp.arange(6.0).reshape(2, 3) * step},
          "asi_state": {}}


def test_save_every_and_restore_exactly(tmp_path):
  ckpt = training.Checkpointer(str(tmp_path / "ckpt"), every=2)
  assert ckpt.latest_step() is None
  # Orbax saves the first step, then every 2 steps, or when forced.
  assert [ckpt.save(s, _state(s)) for s in (1, 2, 3, 4)] == [True, True,
                                                            False, True]
  assert ckpt.save(5, _state(5), force=True)
  ckpt.wait()
  assert ckpt.latest_step() == 5
  again = training.Checkpointer(str(tmp_path / "ckpt"), every=2)
  assert again.latest_step() == 5
  got = again.restore(5, like=_state(0))
  want = _state(5)
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  again.close()
  ckpt.close()


def test_the_controller_is_saved_beside_its_checkpoint(tmp_path):
  ckpt = training.Checkpointer(str(tmp_path / "ckpt"), every=1)
  controller = lv.RankController(patience=3, headroom=2.0)
  ckpt.save(1, _state(1), controller=controller)
  ckpt.wait()
  assert os.path.exists(tmp_path / "ckpt" / "rank_controller-1.json")
  fresh = lv.RankController(patience=3, headroom=2.0)
  assert ckpt.restore_controller(fresh, 1)
  assert fresh.state_dict() == controller.state_dict()
  assert not ckpt.restore_controller(fresh, 2)   # nothing saved at 2
  assert not ckpt.restore_controller(None, 1)
  assert not ckpt.restore_controller(fresh, 0)   # a fresh run
  ckpt.close()
