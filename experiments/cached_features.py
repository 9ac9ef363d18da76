"""Fine-tune the last layers of a frozen network from cached features.

When only the last k layers of a network are trained and every BatchNorm
before them uses its running statistics, the frozen prefix is a fixed
function of the image: its output can be computed once per image and reused
by every method, seed and step. This module cuts a Linen model at the input
of one block (``features/17`` of MobileNetV2, ``layer4/0`` of a ResNet):

* :func:`block_inputs` runs the model on images and returns what the block
  receives (the rest of the model is dead code that XLA drops);
* :class:`FromBlock` wraps the model so that ``apply(variables, features)``
  runs it with the block's input replaced by ``features``; the prefix is then
  dead code too, so a jitted training step holds only the tail.

The results equal the full model's to float32 round-off (the cut changes no
arithmetic); ``tests/experiments/test_cached_features.py`` checks it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_BLOCK = re.compile(r"^([^/]+/\d+)/")


def block_of(path: str) -> str | None:
  """The top-level block holding a layer: ``"layer4/0"`` for
  ``"layer4/0/conv1"``; None when the layer is not inside a numbered block
  (a stem convolution, the classifier)."""
  m = _BLOCK.match(path)
  return m.group(1) if m else None


def cut_block(trained_paths: Sequence[str]) -> str | None:
  """The block to cut at so that every trained layer is behind the cut.

  Args:
    trained_paths: Module paths of the trained layers, earliest first (the
      classifier head may be among them).

  Returns:
    The block of the earliest trained layer that sits in a numbered block,
    or None if a trained layer precedes every block (nothing to cache).
  """
  for path in trained_paths:
    block = block_of(path)
    if block is not None:
      return block
    if not path.startswith(("classifier", "fc")):
      return None  # a stem layer is trained: the whole model is live
  return None


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


@contextlib.contextmanager
def _at_block(block: str, replace) -> Iterator[None]:
  """Calls ``replace(args)`` on the positional arguments of ``block``."""

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and _path(context.module) == block:
      args = replace(args)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def block_inputs(model: nn.Module, variables, x: jax.Array, block: str,
                 **kwargs) -> jax.Array:
  """The input ``block`` receives when ``model`` runs on ``x``.

  Args:
    model: A Linen model.
    variables: Its variables.
    x: Its input, e.g. ``float32[N, S, S, 3]``.
    block: Module path of the block, from :func:`cut_block`.
    **kwargs: Further arguments of ``model.apply`` (``train=False`` to use
      running BatchNorm statistics).

  Returns:
    The block's first positional argument, e.g. ``float32[N, 7, 7, 160]``.
  """
  seen = []

  def keep(args):
    seen.append(args[0])
    return args

  with _at_block(block, keep):
    model.apply(variables, x, **kwargs)
  if len(seen) != 1:
    raise ValueError(f"block {block!r} was called {len(seen)} times")
  return seen[0]


@dataclasses.dataclass(frozen=True)
class FromBlock:
  """``model`` run from ``block``'s input: ``apply(variables, features)``.

  Attributes:
    model: The Linen model.
    block: Module path of the block whose input ``features`` replaces.
    image_shape: Shape of the model's own input; a zero image of this shape
      feeds the prefix, which no output depends on.
  """

  model: nn.Module
  block: str
  image_shape: tuple[int, ...]

  def apply(self, variables, features: jax.Array, *args,
            **kwargs) -> Any:
    """``model.apply`` with the block's input replaced by ``features``."""
    image = jnp.zeros((features.shape[0],) + tuple(self.image_shape[1:]),
                      jnp.float32)
    with _at_block(self.block, lambda a: (features,) + tuple(a[1:])):
      return self.model.apply(variables, image, *args, **kwargs)
