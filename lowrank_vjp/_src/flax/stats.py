"""Reading what the Linen modules sowed: :func:`collect_stats`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src.measure import layer_log

CompressionStats = stats_lib.CompressionStats

COLLECTION = "compression"
"""Default name of the Linen collection the Linen modules sow their stats into."""

STATS = "stats"
"""Name of the sown variable inside the collection."""

MODULE_NAME = re.compile(
    rf"^(?:{'|'.join(layer_log.MODULES)})_\d+$")
"""Auto-generated names of the Linen modules (dropped from reported paths)."""


def _value(x):
  """Unwraps an NNX Variable (or anything with ``get_value``)."""
  get = getattr(x, "get_value", None)
  return get() if callable(get) else x


def _find(tree, path, out):
  tree = _value(tree)
  if not isinstance(tree, Mapping):
    return
  for key, sub in tree.items():
    sub = _value(sub)
    if key == STATS and not isinstance(sub, Mapping):
      out.append((path, sub))
    else:
      _find(sub, path + (str(key),), out)


def collect_stats(variables_or_state: Mapping[str, Any],
                  collection: str = COLLECTION
                  ) -> dict[str, CompressionStats]:
  """Flattens a sown ``"compression"`` collection into ``{path: stats}``.

  Keys are module paths joined by ``"/"``. The module's own auto-generated
  name is dropped when it is the only such module under its layer, so
  ``nn.Conv(name="conv1")`` reports under ``"conv1"`` rather than
  ``"conv1/CompressedConvGeneralDilated_0"``. A layer called several times in
  one ``apply`` sows several stats; when they agree in their static fields
  (shape, capacity, …) they are stacked along a new leading axis, otherwise
  they are reported as ``"path#0"``, ``"path#1"``, ….

  Args:
    variables_or_state: What ``apply(..., mutable=["compression"])``
      returned as its second output, a full variables dict, or the
      collection itself (a nested mapping whose leaves are ``"stats"``
      tuples).
    collection: The collection name the Linen modules sowed into.

  Returns:
    ``{"path/to/layer": CompressionStats}``, sorted by path; empty when
    nothing was sown.

  Example::

    import flax.linen as nn
    import jax, jax.numpy as jnp
    import lowrank_vjp.flax as lvf

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="conv",
                    conv_general_dilated_cls=lvf.conv_cls(eps=1.0))(x)
        return nn.Dense(2, name="head",
                        dot_general_cls=lvf.dense_cls(eps=1.0))(x.mean((1, 2)))

    x = jnp.ones((2, 8, 8, 3))
    params = Net().init(jax.random.key(0), x)["params"]
    _, state = Net().apply({"params": params}, x, mutable=["compression"])
    sorted(lvf.collect_stats(state))    # ["conv", "head"]
  """
  tree = _value(variables_or_state)
  if isinstance(tree, Mapping) and collection in tree:
    tree = tree[collection]
  found: list[tuple[tuple[str, ...], Any]] = []
  _find(tree, (), found)
  per_parent: dict[tuple[str, ...], int] = {}
  for path, _ in found:
    per_parent[path[:-1]] = per_parent.get(path[:-1], 0) + 1
  out: dict[str, CompressionStats] = {}
  for path, sown in found:
    if path and MODULE_NAME.match(path[-1]) and per_parent[path[:-1]] == 1:
      path = path[:-1]
    key = "/".join(path)
    entries = list(sown) if isinstance(sown, (tuple, list)) else [sown]
    if len(entries) == 1:
      out[key] = entries[0]
      continue
    structures = {jax.tree_util.tree_structure(e) for e in entries}
    if len(structures) == 1:
      out[key] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *entries)
    else:
      for i, entry in enumerate(entries):
        out[f"{key}#{i}"] = entry
  return dict(sorted(out.items()))
