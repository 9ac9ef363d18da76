"""PyTorch state dicts into Flax variables, strictly, key by key.

The models here name their modules as the PyTorch originals do, so a torch
key ``a.b.c.weight`` belongs to the Flax module at path ``a/b/c``. What the
torch tensor becomes depends on that module's Flax parameters:

=================  =====================  ====================================
Flax module        torch tensor           Flax variable
=================  =====================  ====================================
``nn.Conv``        ``weight [O, I, kh, kw]``  ``params/…/kernel [kh, kw, I, O]``
``nn.Dense``       ``weight [O, I]``       ``params/…/kernel [I, O]``
``nn.BatchNorm``   ``weight``, ``bias``     ``params/…/scale``, ``…/bias``
``nn.BatchNorm``   ``running_mean/var``     ``batch_stats/…/mean``, ``…/var``
any                ``bias``                ``params/…/bias``
=================  =====================  ====================================

``num_batches_tracked`` is dropped. Every other torch tensor must land on a
Flax variable of the right shape, and every Flax variable must be written,
unless its module path matches ``ignore``: a silently skipped layer would
train from random weights while looking pretrained.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta


class WeightConversionError(ValueError):
  """A state dict does not match the model it is loaded into."""


def _unbox(tree):
  return meta.unbox(tree)


def _torch_to_flax(module_params: Mapping[str, Any], leaf: str,
                   tensor: np.ndarray):
  """Returns ``(collection, name, array)`` for one torch tensor."""
  if leaf == "running_mean":
    return "batch_stats", "mean", tensor
  if leaf == "running_var":
    return "batch_stats", "var", tensor
  if leaf == "bias":
    return "params", "bias", tensor
  if leaf == "weight":
    if "scale" in module_params:
      return "params", "scale", tensor
    if "kernel" in module_params:
      if tensor.ndim == 4:  # OIHW -> HWIO
        return "params", "kernel", np.transpose(tensor, (2, 3, 1, 0))
      if tensor.ndim == 2:  # [out, in] -> [in, out]
        return "params", "kernel", tensor.T
      if tensor.ndim == 3:  # Conv1d: OIW -> WIO
        return "params", "kernel", np.transpose(tensor, (2, 1, 0))
    if "embedding" in module_params:
      return "params", "embedding", tensor
  raise WeightConversionError(
      f"no Flax variable for torch tensor {leaf!r} of shape "
      f"{tuple(tensor.shape)} (module parameters: {sorted(module_params)})")


def from_torch(variables: Mapping[str, Any],
               state_dict: Mapping[str, np.ndarray], *, prefix: str = "",
               ignore: str | None = None) -> dict[str, Any]:
  """Loads a PyTorch state dict into (a copy of) Flax ``variables``.

  Args:
    variables: The model's variables (``model.init(...)``), used as the
      template for names, shapes and dtypes; entries that are not written
      (``ignore``) keep their values.
    state_dict: ``{torch_key: np.ndarray}``, e.g. from
      :func:`lowrank_vjp.models.load_torch_checkpoint`.
    prefix: Flax module path the torch model sits under (e.g. ``"encoder"``
      for a MobileNetV2 used as a segmentation encoder).
    ignore: Regex on Flax module paths (``re.fullmatch``, ``/``-separated,
      without ``prefix``) whose variables are left as initialised and whose
      torch tensors are skipped — typically the classification head when
      the number of classes changes (``"classifier/1"``).

  Returns:
    New variables: a nested dict with every converted array as a
    ``jax.Array`` of the template's dtype.

  Raises:
    WeightConversionError: on a torch tensor without a Flax home, a shape
      mismatch, or a Flax variable left unwritten; the message lists them.

  Example::

    model = lowrank_vjp.models.MobileNetV2(num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    sd = lowrank_vjp.models.load_torch_state_dict(path)
    variables = lowrank_vjp.models.from_torch(variables, sd,
                                              ignore="classifier/1")
  """
  skip = re.compile(ignore) if ignore else None
  pre = tuple(p for p in prefix.split("/") if p)
  flat = {col: traverse_util.flatten_dict(_unbox(dict(tree)))
          for col, tree in variables.items()}
  params_by_module: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, value in flat.get("params", {}).items():
    params_by_module.setdefault(path[:-1], {})[path[-1]] = value
  written: set[tuple[str, tuple[str, ...]]] = set()
  problems = []
  for key, tensor in state_dict.items():
    *module, leaf = key.split(".")
    if leaf == "num_batches_tracked":
      continue
    if skip is not None and skip.fullmatch("/".join(module)):
      continue
    module_path = pre + tuple(module)
    module_params = params_by_module.get(module_path)
    if module_params is None:
      problems.append(f"{key}: no Flax module at {'/'.join(module_path)!r}")
      continue
    try:
      col, name, array = _torch_to_flax(module_params, leaf,
                                        np.asarray(tensor))
    except WeightConversionError as e:
      problems.append(f"{key}: {e}")
      continue
    target = flat.get(col, {}).get(module_path + (name,))
    if target is None:
      problems.append(f"{key}: no Flax variable {col}/"
                      f"{'/'.join(module_path + (name,))}")
      continue
    if tuple(target.shape) != tuple(array.shape):
      problems.append(f"{key}: torch shape {tuple(tensor.shape)} converts to "
                      f"{tuple(array.shape)}, Flax {col}/"
                      f"{'/'.join(module_path + (name,))} is "
                      f"{tuple(target.shape)}")
      continue
    flat[col][module_path + (name,)] = jnp.asarray(array, dtype=target.dtype)
    written.add((col, module_path + (name,)))
  for col in ("params", "batch_stats"):
    for path in flat.get(col, {}):
      if path[:len(pre)] != pre:
        continue
      rel = "/".join(path[len(pre):-1])
      if skip is not None and skip.fullmatch(rel):
        continue
      if (col, path) not in written:
        problems.append(f"Flax {col}/{'/'.join(path)} has no torch tensor")
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise WeightConversionError(
        f"state dict does not match the model ({len(problems)} problems):\n  "
        f"{shown}{more}")
  return {col: traverse_util.unflatten_dict(tree) for col, tree in flat.items()}
