"""What the NNX models share: torch-style child names, Linen's layer
settings, and loading Linen variables.

The NNX models mirror the Linen ones module for module. A child named as in
torchvision (``"0"``, ``"1"``, …) is set with :func:`set_child`, so that
``nnx.iter_graph`` reports the path ``("features", "17", "conv", "1", "0")``
where Linen has ``features/17/conv/1/0``, and a Linen variables dict loads
into the NNX model path by path (:func:`load_linen_variables`). Layers are
built from the Linen factories of :mod:`lowrank_vjp.models._layers` and copy
their settings (padding, initialisers, BatchNorm momentum and epsilon), so
the two definitions cannot drift apart.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.core import meta

from lowrank_vjp.models import _layers, _registry

# Linen collection -> the NNX variable type that holds it.
_COLLECTIONS = (("params", nnx.Param), ("batch_stats", nnx.BatchStat))


def set_child(module: nnx.Module, name: str | int, child: Any) -> None:
  """Sets ``child`` as ``module``'s attribute ``str(name)``.

  ``name`` need not be an identifier (``"0"``): NNX keeps the attribute and
  reports it in every path (``nnx.iter_graph``, ``nnx.state``) as that
  string, as Linen names a submodule ``name="0"``.

  Args:
    module: The parent (in its ``__init__``).
    name: The torch-style name, e.g. ``0`` or ``"downsample"``.
    child: The submodule (or any attribute value).

  Example::

    class Seq(nnx.Module):
      def __init__(self, rngs):
        set_child(self, 0, nnx.Linear(2, 3, rngs=rngs))
  """
  setattr(module, str(name), child)


def get_child(module: nnx.Module, name: str | int) -> Any:
  """``module``'s child ``str(name)`` (set with :func:`set_child`)."""
  return getattr(module, str(name))


def conv(in_features: int, features: int, kernel: int, stride: int = 1,
         groups: int = 1, *, rngs: nnx.Rngs,
         use_bias: bool = False) -> nnx.Conv:
  """The ``nnx.Conv`` twin of :func:`_layers.conv`.

  Padding (``(k - 1) // 2`` per side, as torch), strides, groups, bias and
  initialisers are read from the Linen layer that factory builds.

  Args:
    in_features: Input channels ``C`` of ``[N, H, W, C]``.
    features: Output channels.
    kernel: Square kernel size.
    stride: Stride on both spatial axes.
    groups: ``feature_group_count`` (``in_features`` for depthwise).
    rngs: Initialisation keys.
    use_bias: Whether the convolution has a bias (torch: no, before a BN).

  Returns:
    The convolution; its ``kernel`` is ``[kernel, kernel, in_features /
    groups, features]``, as Linen's.
  """
  ref = _layers.conv(features, kernel, stride, groups, use_bias=use_bias)
  return nnx.Conv(in_features, ref.features, ref.kernel_size, ref.strides,
                  padding=ref.padding,
                  feature_group_count=ref.feature_group_count,
                  use_bias=ref.use_bias, kernel_init=ref.kernel_init,
                  bias_init=ref.bias_init, rngs=rngs)


def batch_norm(num_features: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """The ``nnx.BatchNorm`` twin of :func:`_layers.batch_norm`.

  Momentum (0.9, torch's 0.1), epsilon (1e-5) and the variance formula are
  read from the Linen layer. ``use_running_average`` is left unset, as in
  Linen: callers pass it per call (``not train``).
  """
  ref = _layers.batch_norm()
  return nnx.BatchNorm(num_features, use_running_average=None,
                       momentum=ref.momentum, epsilon=ref.epsilon,
                       use_fast_variance=ref.use_fast_variance, rngs=rngs)


def head(in_features: int, num_classes: int, *,
         rngs: nnx.Rngs) -> nnx.Linear:
  """The classification ``nnx.Linear``, initialised as the Linen heads."""
  return nnx.Linear(in_features, num_classes, kernel_init=_layers.head_init,
                    rngs=rngs)


def _name(collection: str, path: tuple[str, ...]) -> str:
  return "/".join((collection,) + path)


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any], *,
                         ignore: str | None = None) -> None:
  """Copies a Linen variables dict into an NNX model with the same paths.

  Every ``nnx.Param`` at path ``p`` gets ``variables["params"][p...]`` and
  every ``nnx.BatchStat`` ``variables["batch_stats"][p...]``, cast to the
  NNX variable's dtype. Nothing is written unless everything fits.

  Args:
    model: The NNX model, updated in place. It may come from
      ``nnx.eval_shape``, which skips the random initialisation: its
      parameters and statistics become arrays (an RNG stream, such as
      dropout's, stays abstract).
    variables: ``{"params": ..., "batch_stats": ...}`` as ``model.init`` /
      :func:`lowrank_vjp.models.pretrained` return them for the Linen twin
      (boxed ``nn.Partitioned`` leaves are unboxed).
    ignore: Regex on module paths (``re.fullmatch``, ``/``-separated, e.g.
      ``"classifier/1"``) whose NNX variables keep their values and whose
      Linen leaves are skipped.

  Raises:
    ValueError: naming each path (``params/features/0/0/kernel``) that the
      Linen dict lacks, whose shape differs, whose Linen leaf is not an
      array (a ``jax.ShapeDtypeStruct``), or that the Linen dict has and the
      NNX model does not (another collection included).

  Example::

    linen = lowrank_vjp.models.MobileNetV2(num_classes=10)
    variables = linen.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    model = lowrank_vjp.models.nnx.MobileNetV2(10, rngs=nnx.Rngs(0))
    lowrank_vjp.models.nnx.load_linen_variables(model, variables)
  """
  skip = re.compile(ignore) if ignore else None

  def skipped(path):
    return skip is not None and skip.fullmatch("/".join(path[:-1])) is not None

  problems = []
  known = {collection for collection, _ in _COLLECTIONS}
  for collection in variables:
    if collection not in known:
      problems.append(f"{collection}: a Linen collection the NNX model has "
                      f"no variables for (it loads {sorted(known)})")
  updates = {}
  for collection, kind in _COLLECTIONS:
    source = traverse_util.flatten_dict(
        meta.unbox(dict(variables.get(collection, {}))))
    source = {tuple(str(k) for k in p): v for p, v in source.items()}
    targets = {}
    for nnx_path, var in nnx.to_flat_state(nnx.state(model, kind)):
      path = tuple(str(k) for k in nnx_path)
      targets[path] = var
      if skipped(path):
        continue
      name = _name(collection, path)
      if path not in source:
        problems.append(f"{name}: missing from the Linen variables")
        continue
      value, target = source[path], var.get_value()
      if isinstance(value, jax.ShapeDtypeStruct):
        problems.append(f"{name}: the Linen leaf is a shape, not an array")
        continue
      if tuple(jnp.shape(value)) != tuple(target.shape):
        problems.append(f"{name}: Linen shape {tuple(jnp.shape(value))}, NNX "
                        f"shape {tuple(target.shape)}")
        continue
      updates[nnx_path] = jnp.asarray(value, dtype=target.dtype)
    for path in source:
      if path not in targets and not skipped(path):
        problems.append(f"{_name(collection, path)}: no nnx."
                        f"{kind.__name__} at this path in the NNX model")
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ValueError(
        f"Linen variables do not match the NNX model ({len(problems)} "
        f"problems):\n  {shown}{more}")
  nnx.update(model, traverse_util.unflatten_dict(updates))


def pretrained(build: Callable[..., nnx.Module], name: str,
               num_classes: int = 1000, *, rngs: nnx.Rngs,
               weights: str | os.PathLike | None = None,
               **model_kwargs) -> nnx.Module:
  """The NNX twin of registry model ``name``, with its ImageNet weights.

  The Linen registry finds and converts the weights
  (:func:`lowrank_vjp.models.pretrained` with 1000 classes), then
  :func:`load_linen_variables` copies them; for ``num_classes`` other than
  1000 the head (the spec's ``head`` path) keeps its initialisation from
  ``rngs``.

  Args:
    build: The NNX class, ``build(num_classes, rngs=rngs, **model_kwargs)``.
    name: A key of :data:`lowrank_vjp.models.MODELS`.
    num_classes: Head size.
    rngs: Initialisation keys (of the head when it is not loaded).
    weights: A ``.pth`` file; by default the registry's offline file.
    **model_kwargs: More fields, for the NNX model and its Linen twin.

  Returns:
    The NNX model.

  Raises:
    FileNotFoundError: when no weights file is given or installed.
    WeightConversionError: when the file does not fit the model.
  """
  _, variables = _registry.pretrained(name, 1000, weights=weights,
                                      **model_kwargs)
  model = build(num_classes, rngs=rngs, **model_kwargs)
  ignore = None if num_classes == 1000 else _registry.get_spec(name).head
  load_linen_variables(model, variables, ignore=ignore)
  return model
