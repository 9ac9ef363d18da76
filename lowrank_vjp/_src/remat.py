"""Compressed residuals under ``jax.checkpoint``: named, and a policy.

Every small residual the library saves for a backward pass (a compressed
op's core, factors or codes; a bit-packed ReLU mask; a coded slope) carries
the ``checkpoint_name`` :data:`RESIDUAL_NAME`. Under ``jax.checkpoint`` (Flax
``nn.remat``) with :func:`save_compressed_residuals`, a block saves exactly
those: its backward pass recomputes nothing that the residuals give (no
compression is redone), and the block's input need not be kept when every
op inside it saves a named residual. Without a policy, ``jax.checkpoint``
saves the block's inputs and recomputes the rest, compressions included.

XLA:CPU removes the barrier that keeps rematerialised values from being
merged back into the forward pass, so on the CPU remat changes little of a
step's peak; measure on the accelerator.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

RESIDUAL_NAME = "lowrank_vjp_residual"
"""The ``checkpoint_name`` of every array the library saves compressed."""


def named(tree):
  """``tree`` with each array named :data:`RESIDUAL_NAME` for remat."""
  return jax.tree.map(lambda a: checkpoint_name(a, RESIDUAL_NAME), tree)


def save_compressed_residuals():
  """The ``jax.checkpoint`` policy that saves only the library's residuals.

  Returns:
    ``jax.checkpoint_policies.save_only_these_names(RESIDUAL_NAME)``.

  Example::

    block = jax.checkpoint(block, policy=lv.save_compressed_residuals())
    # Flax Linen: nn.remat(Block, policy=lv.save_compressed_residuals())
  """
  return jax.checkpoint_policies.save_only_these_names(RESIDUAL_NAME)
