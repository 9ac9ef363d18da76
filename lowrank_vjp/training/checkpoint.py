"""Orbax checkpoints of a training state, with the rank controller beside it.

A :class:`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager``
(synchronous saves, the last two kept) and writes a
:class:`lowrank_vjp.RankController`'s state as JSON next to each checkpoint,
so a resumed run continues bit for bit: same state, same capacities, same
batches (those are a function of the step). Orbax is imported when a
:class:`Checkpointer` is made, not with this module.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

import lowrank_vjp as lv


class Checkpointer:
  """Saves and restores a training state under ``directory``.

  Args:
    directory: The checkpoint directory (made absolute).
    every: Save every this many steps (``save`` skips the others unless
      forced).
    max_to_keep: Checkpoints kept.

  Example:
    >>> ckpt = Checkpointer("/tmp/run/ckpt", every=100)  # doctest: +SKIP
    >>> start = ckpt.latest_step() or 0
    >>> if start:
    ...   state = ckpt.restore(start, like=state)
    >>> ckpt.save(step, state)
    >>> ckpt.wait()
  """

  def __init__(self, directory: str, *, every: int = 1,
               max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=max(1, every),
        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The step of the latest checkpoint, or None."""
    step = self.manager.latest_step()
    return None if step is None else int(step)

  def restore(self, step: int, like: Any) -> Any:
    """The state saved at ``step``, with the structure and dtypes of ``like``.

    Args:
      step: A saved step.
      like: A state of the same structure (arrays or
        ``jax.ShapeDtypeStruct``).

    Returns:
      The restored state.
    """
    ocp = self._ocp
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def save(self, step: int, state: Any, *,
           controller: lv.RankController | None = None,
           force: bool = False) -> bool:
    """Saves ``state`` as ``step`` if due (or ``force``), and ``controller``.

    Returns:
      Whether a checkpoint was written.
    """
    saved = bool(self.manager.save(
        step, args=self._ocp.args.StandardSave(state), force=force))
    if saved or force:
      self.save_controller(controller, step)
    return saved

  def _controller_path(self, step: int) -> str:
    return os.path.join(self.directory, f"rank_controller-{step}.json")

  def save_controller(self, controller: lv.RankController | None,
                      step: int) -> None:
    """Writes ``controller``'s state beside the checkpoint of ``step``."""
    if controller is None:
      return
    with open(self._controller_path(step), "w") as f:
      json.dump(controller.state_dict(), f)

  def restore_controller(self, controller: lv.RankController | None,
                         step: int) -> bool:
    """Loads ``controller``'s state saved at ``step``; whether there was one."""
    path = self._controller_path(step)
    if controller is None or not step or not os.path.exists(path):
      return False
    with open(path) as f:
      controller.load_state_dict(json.load(f))
    return True

  def wait(self) -> None:
    """Waits for pending saves."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and closes the manager."""
    self.manager.close()
