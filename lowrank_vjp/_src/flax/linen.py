"""Flax adapters: compressed convolutions and dense layers in Linen and NNX.

Linen's ``nn.Conv`` and ``nn.Dense`` build their contraction from a Module
class (``conv_general_dilated_cls`` / ``dot_general_cls``), instantiated with
no arguments inside the layer and called like the ``lax`` function. The
Modules here do that, run the compressed drop-in and ``sow`` its
:class:`CompressionStats` into a collection (``"compression"`` by default),
which the caller reads back with ``mutable=["compression"]``::

  conv = nn.Conv(32, (3, 3), conv_general_dilated_cls=lvf.conv_cls(eps=0.9))

NNX layers take the function itself, so the drop-ins plug in directly and
need no adapter (the Linen classes here cannot be NNX ``*_cls`` arguments)::

  conv = nnx.Conv(3, 32, (3, 3), conv_general_dilated=lv.compressed_conv(),
                  rngs=nnx.Rngs(0))
  dense = nnx.Linear(32, 10, dot_general=lv.compressed_dense(),
                     rngs=nnx.Rngs(0))

ASI (:func:`lowrank_vjp.asi_conv`) carries its factors from step to step; its
Linen Module, :class:`AsiConvGeneralDilated` (``conv_cls(method="asi")``),
keeps them in a variable collection (``"asi_state"`` by default) that the
training loop passes in and takes back like ``"batch_stats"``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import tracers as flax_tracers

from lowrank_vjp._src.methods import asi as asi
from lowrank_vjp._src import dropins as compressed
from lowrank_vjp._src.tensor import hosvd as decompositions
from lowrank_vjp._src.control import rank_controller as rank_control
from lowrank_vjp._src.tensor import tucker as residuals
from lowrank_vjp._src.methods import base as config_lib

CompressionConfig = config_lib.CompressionConfig
CompressionStats = residuals.CompressionStats

COLLECTION = "compression"
"""Default name of the Linen collection the adapters sow their stats into."""

ASI_COLLECTION = "asi_state"
"""Default name of the Linen collection holding ASI's factors."""

_STATS = "stats"


def _inner_transform(module: nn.Module) -> bool:
  """Whether the call runs inside a raw JAX transform opened in the model.

  Linen's ``ConvLocal`` calls the convolution inside ``jax.eval_shape`` only
  to infer a shape; storing variables there would leak tracers. Such a call
  traces at a different level than the module's scope.
  """
  try:
    return flax_tracers.current_trace() != module.scope.trace_level
  except Exception:  # pylint: disable=broad-except  # Flax internals moved.
    return False


def _sow_stats(module: nn.Module, stats: CompressionStats) -> None:
  """Sows ``stats`` unless the call runs inside a JAX transform of its own."""
  if not _inner_transform(module):
    module.sow(module.collection, _STATS, stats)


class CompressedConvGeneralDilated(nn.Module):
  """``lax.conv_general_dilated`` as a Linen Module that saves compressed input.

  Pass it (usually through :func:`conv_cls`) as ``conv_general_dilated_cls``
  of ``nn.Conv``. Each call runs :class:`lowrank_vjp.CompressedConv` and sows
  its :class:`CompressionStats` into ``collection`` under ``"stats"`` (a
  tuple, one entry per call); the sow is a no-op unless ``collection`` is
  mutable, and is skipped when the call runs inside a raw JAX transform
  opened within the model (``nn.ConvLocal`` runs it under
  ``jax.eval_shape`` only to infer a shape). The module has no parameters.

  Attributes:
    config: The compression settings.
    collection: Linen collection the stats are sown into.

  Example::

    import flax.linen as nn
    import jax, jax.numpy as jnp
    import lowrank_vjp.flax as lvf

    conv = nn.Conv(8, (3, 3), conv_general_dilated_cls=lvf.conv_cls(
        method="hosvd", eps=0.9, on_overflow="ignore"))
    x = jnp.ones((2, 16, 16, 3))
    params = conv.init(jax.random.key(0), x)["params"]
    y, state = conv.apply({"params": params}, x, mutable=["compression"])
    stats = lvf.collect_stats(state)   # {"": CompressionStats(...)}
  """

  config: CompressionConfig = CompressionConfig()
  collection: str = COLLECTION

  def __call__(self, lhs: jax.typing.ArrayLike, rhs: jax.typing.ArrayLike,
               window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count: int = 1,
               batch_group_count: int = 1, precision=None,
               preferred_element_type=None, out_sharding=None) -> jax.Array:
    """Same arguments as ``lax.conv_general_dilated``; returns its output.

    Args:
      lhs: The activation, e.g. ``[N, H, W, C]`` for Linen's layout.
      rhs: The kernel, e.g. ``[KH, KW, C / groups, O]``.
      window_strides: As ``lax.conv_general_dilated``.
      padding: As ``lax.conv_general_dilated``.
      lhs_dilation: As ``lax.conv_general_dilated``.
      rhs_dilation: As ``lax.conv_general_dilated``.
      dimension_numbers: As ``lax.conv_general_dilated``.
      feature_group_count: As ``lax.conv_general_dilated``.
      batch_group_count: As ``lax.conv_general_dilated``.
      precision: As ``lax.conv_general_dilated``.
      preferred_element_type: As ``lax.conv_general_dilated``.
      out_sharding: As ``lax.conv_general_dilated``.

    Returns:
      The exact convolution output, e.g. ``[N, H', W', O]``.
    """
    config = rank_control.configured(self.config, _layer_key(self))
    y, stats = compressed.CompressedConv(config).with_stats(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type, out_sharding)
    _sow_stats(self, stats)
    return y


class AsiConvGeneralDilated(nn.Module):
  """``lax.conv_general_dilated`` as a Linen Module running ASI.

  Pass it (usually through ``conv_cls(method="asi", ...)``) as
  ``conv_general_dilated_cls`` of ``nn.Conv``. Each call runs
  :func:`lowrank_vjp.asi_conv` at fixed ranks: the saved residual is a Tucker
  core and factors, the factors refreshed by one subspace iteration started
  from the previous step's (the exact truncated HOSVD on the first step).

  The factors live in the ``state_collection`` (``"asi_state"``) as two
  variables, Orbax-friendly (plain arrays, no None leaves):

  * ``"factors"``: ``{str(axis): [I_a, K_a]}`` for each compressed axis of
    ``lhs``, in the compute dtype (float32 for float32 or bfloat16 inputs);
  * ``"started"``: ``bool[]``, False until a step has written factors.

  A call that creates the state (``init``, or an ``apply`` whose variables
  lack it, with the collection mutable) stores it unstarted. A call that
  finds it reads it, and writes the new factors back when the collection is
  mutable; when it is not, the state is only read (for example evaluation:
  the forward pass is exact whatever the factors). A call that finds no
  state and cannot create it raises. A layer called several times in one
  ``apply`` shares one state (its inputs must then have one shape).

  Stats are sown into ``collection`` as :class:`CompressedConvGeneralDilated`
  does (``method="asi"``; ``needed_ranks`` are the fixed ranks). The module
  has no parameters.

  Attributes:
    ranks: Fixed rank per axis of ``lhs`` (an int for every axis, or a tuple
      whose None entries leave an axis uncompressed); None: ``rank_fraction``
      of every axis.
    rank_fraction: Rank as a fraction of each axis when ``ranks`` is None,
      in ``(0, 1]`` (at most the rank of the axis' unfolding).
    collection: Linen collection the stats are sown into.
    state_collection: Linen collection holding the factors.

  Example::

    import flax.linen as nn
    import jax, jax.numpy as jnp
    import lowrank_vjp.flax as lvf

    conv = nn.Conv(8, (3, 3), conv_general_dilated_cls=lvf.conv_cls(
        method="asi", rank_fraction=0.5))
    x = jnp.ones((2, 16, 16, 3))
    variables = conv.init(jax.random.key(0), x)  # "params", "asi_state"
    y, state = conv.apply(variables, x, mutable=["asi_state", "compression"])
    variables = {**variables, "asi_state": state["asi_state"]}  # next step
  """

  ranks: int | tuple[int | None, ...] | None = None
  rank_fraction: float = 0.25
  collection: str = COLLECTION
  state_collection: str = ASI_COLLECTION

  def __call__(self, lhs: jax.typing.ArrayLike, rhs: jax.typing.ArrayLike,
               window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count: int = 1,
               batch_group_count: int = 1, precision=None,
               preferred_element_type=None, out_sharding=None) -> jax.Array:
    """Same arguments as ``lax.conv_general_dilated``; returns its output.

    Args:
      lhs: The activation, e.g. ``[N, H, W, C]`` for Linen's layout.
      rhs: The kernel, e.g. ``[KH, KW, C / groups, O]``.
      window_strides: As ``lax.conv_general_dilated``.
      padding: As ``lax.conv_general_dilated``.
      lhs_dilation: As ``lax.conv_general_dilated``.
      rhs_dilation: As ``lax.conv_general_dilated``.
      dimension_numbers: As ``lax.conv_general_dilated``.
      feature_group_count: As ``lax.conv_general_dilated``.
      batch_group_count: As ``lax.conv_general_dilated``.
      precision: As ``lax.conv_general_dilated``.
      preferred_element_type: As ``lax.conv_general_dilated``.
      out_sharding: As ``lax.conv_general_dilated``.

    Returns:
      The exact convolution output, e.g. ``[N, H', W', O]``.

    Raises:
      ValueError: if the state collection holds no state for this layer and
        is not mutable, or holds factors of other shapes.
    """
    lhs = jnp.asarray(lhs)
    conv = asi.asi_conv(ranks=self.ranks, rank_fraction=self.rank_fraction)
    dtype = decompositions.compute_dtype(lhs.dtype)
    fresh = conv.init_state(lhs.shape, dtype)
    inner = _inner_transform(self)
    if inner:   # nn.ConvLocal's shape inference: no state touched.
      state, write = fresh, False
    else:
      state, write = self._read_state(fresh)
    y, stats, new_state = conv(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type, out_sharding, state=state)
    if write:
      factors, started = _state_tree(new_state)
      self.put_variable(self.state_collection, "factors", {
          k: v.astype(dtype) for k, v in factors.items()})
      self.put_variable(self.state_collection, "started", started)
    _sow_stats(self, stats)
    return y

  def _read_state(self, fresh: asi.AsiState) -> tuple[asi.AsiState, bool]:
    """``(state to use, whether to write the new one back)``."""
    col = self.state_collection
    mutable = self.is_mutable_collection(col)
    if not self.has_variable(col, "started"):
      if not mutable:
        raise ValueError(
            f"AsiConvGeneralDilated at {'/'.join(map(str, self.path))!r} "
            f"found no ASI state in the {col!r} collection. Pass the "
            f"collection in the variables (from `init`, or from an `apply` "
            f"with mutable=[{col!r}]), or make it mutable.")
      factors, started = _state_tree(fresh)
      self.put_variable(col, "factors", factors)
      self.put_variable(col, "started", started)
      return fresh, False   # created unstarted: the next call starts it
    factors = self.get_variable(col, "factors")
    started = self.get_variable(col, "started")
    expected = _state_tree(fresh)[0]
    got = {k: tuple(jnp.shape(v)) for k, v in factors.items()}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    if got != want:
      raise ValueError(
          f"ASI state at {'/'.join(map(str, self.path))!r} holds factors of "
          f"shapes {got} but this input needs {want}; the input shape or the "
          "ranks changed since the state was created.")
    state = asi.AsiState(
        factors=tuple(None if f is None else factors[str(a)]
                      for a, f in enumerate(fresh.factors)),
        started=jnp.asarray(started, bool))
    return state, mutable


def _state_tree(state: asi.AsiState) -> tuple[dict[str, jax.Array],
                                               jax.Array]:
  """``({str(axis): factor}, started)``: no None leaves."""
  factors = {str(a): f for a, f in enumerate(state.factors) if f is not None}
  return factors, jnp.asarray(state.started, bool)


class CompressedDotGeneral(nn.Module):
  """``lax.dot_general`` as a Linen Module that saves a compressed ``lhs``.

  Pass it (usually through :func:`dense_cls`) as ``dot_general_cls`` of
  ``nn.Dense`` or ``nn.DenseGeneral``. ``lhs`` is the activation (batch
  first), ``rhs`` the kernel. Each call runs
  :class:`lowrank_vjp.CompressedDense` and sows its :class:`CompressionStats`
  into ``collection`` under ``"stats"``.

  Attributes:
    config: The compression settings.
    collection: Linen collection the stats are sown into.

  Example::

    import flax.linen as nn
    import jax, jax.numpy as jnp
    import lowrank_vjp.flax as lvf

    dense = nn.Dense(4, dot_general_cls=lvf.dense_cls(eps=1.0))
    x = jnp.ones((8, 16))                      # [N, F]
    params = dense.init(jax.random.key(0), x)["params"]
    y, state = dense.apply({"params": params}, x, mutable=["compression"])
    lvf.collect_stats(state)[""].capacity      # (8, 8): rank <= min(8, 16)
  """

  config: CompressionConfig = CompressionConfig()
  collection: str = COLLECTION

  def __call__(self, lhs: jax.typing.ArrayLike, rhs: jax.typing.ArrayLike,
               dimension_numbers, precision=None, preferred_element_type=None,
               *, out_sharding=None) -> jax.Array:
    """Same arguments as ``lax.dot_general``; returns its output.

    Args:
      lhs: The activation, ``[N, F]``, ``[N, T, F]``, ….
      rhs: The kernel, e.g. ``[F, O]``.
      dimension_numbers: ``((lhs_contracting, rhs_contracting),
        (lhs_batch, rhs_batch))``.
      precision: As ``lax.dot_general``.
      preferred_element_type: As ``lax.dot_general``.
      out_sharding: As ``lax.dot_general``.

    Returns:
      The exact ``lax.dot_general`` output, e.g. ``[N, O]``.
    """
    y, stats = compressed.CompressedDense(
        rank_control.configured(self.config, _layer_key(self))).with_stats(
        lhs, rhs, dimension_numbers, precision, preferred_element_type,
        out_sharding=out_sharding)
    _sow_stats(self, stats)
    return y


def conv_cls(**settings: Any) -> functools.partial:
  """A ``conv_general_dilated_cls`` for ``nn.Conv`` with these settings.

  Args:
    **settings: Fields of :class:`lowrank_vjp.CompressionConfig`
      (``method``, ``eps``, ``ranks``, ``rank_fraction``, ``on_overflow``),
      plus optionally ``collection`` (default ``"compression"``). With
      ``method="asi"`` only ``ranks``, ``rank_fraction`` (default 0.25),
      ``collection`` and ``state_collection`` (default ``"asi_state"``) are
      accepted: ASI's ranks are fixed, so ``eps`` and ``on_overflow`` would
      do nothing and are rejected rather than silently ignored.

  Returns:
    ``functools.partial(CompressedConvGeneralDilated, config=...)``, or for
    ``method="asi"`` ``functools.partial(AsiConvGeneralDilated, ...)``;
    ``nn.Conv`` instantiates it with no arguments.

  Raises:
    ValueError: for settings :class:`CompressionConfig` rejects.
    TypeError: for unknown settings (for ASI: any but the four above).

  Example::

    import flax.linen as nn
    import lowrank_vjp.flax as lvf

    conv = nn.Conv(32, (3, 3), conv_general_dilated_cls=lvf.conv_cls(
        method="hosvd", eps=0.9))
    asi = nn.Conv(32, (3, 3), conv_general_dilated_cls=lvf.conv_cls(
        method="asi", rank_fraction=0.25))
  """
  if settings.get("method") == "asi":
    return _asi_partial(settings)
  return _partial(CompressedConvGeneralDilated, settings)


def dense_cls(**settings: Any) -> functools.partial:
  """A ``dot_general_cls`` for ``nn.Dense`` / ``nn.DenseGeneral``.

  Args:
    **settings: As :func:`conv_cls`.

  Returns:
    ``functools.partial(CompressedDotGeneral, config=...)``.

  Raises:
    ValueError: for settings :class:`CompressionConfig` rejects.
    TypeError: for unknown settings.

  Example::

    import flax.linen as nn
    import lowrank_vjp.flax as lvf

    dense = nn.Dense(10, dot_general_cls=lvf.dense_cls(method="svd", eps=0.8))
  """
  return _partial(CompressedDotGeneral, settings)


def _partial(module_cls, settings):
  settings = dict(settings)
  collection = settings.pop("collection", COLLECTION)
  return functools.partial(module_cls, config=CompressionConfig(**settings),
                           collection=collection)


_ASI_SETTINGS = ("ranks", "rank_fraction", "collection", "state_collection")


def _asi_partial(settings):
  settings = dict(settings)
  settings.pop("method")
  unknown = sorted(set(settings) - set(_ASI_SETTINGS))
  if unknown:
    raise TypeError(
        f"conv_cls(method='asi') got unexpected setting(s) {unknown}; ASI "
        f"takes {list(_ASI_SETTINGS)} (its ranks are fixed, so eps and "
        "on_overflow do not apply).")
  config = asi.asi_conv(ranks=settings.get("ranks"),
                        rank_fraction=settings.get("rank_fraction",
                                                   0.25)).config
  return functools.partial(
      AsiConvGeneralDilated, ranks=config.ranks,
      rank_fraction=config.rank_fraction,
      collection=settings.get("collection", COLLECTION),
      state_collection=settings.get("state_collection", ASI_COLLECTION))


_ADAPTER_NAME = re.compile(
    rf"^(?:{CompressedConvGeneralDilated.__name__}|"
    rf"{AsiConvGeneralDilated.__name__}|"
    rf"{CompressedDotGeneral.__name__})_\d+$")


def _layer_key(module: nn.Module) -> str:
  """The layer's name as :func:`collect_stats` reports it (trace time)."""
  path = tuple(str(p) for p in module.path)
  if path and _ADAPTER_NAME.match(path[-1]):
    path = path[:-1]
  return "/".join(path)


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
    if key == _STATS and not isinstance(sub, Mapping):
      out.append((path, sub))
    else:
      _find(sub, path + (str(key),), out)


def collect_stats(variables_or_state: Mapping[str, Any],
                  collection: str = COLLECTION
                  ) -> dict[str, CompressionStats]:
  """Flattens a sown ``"compression"`` collection into ``{path: stats}``.

  Keys are module paths joined by ``"/"``. The adapter's own auto-generated
  name is dropped when it is the only adapter under its layer, so
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
    collection: The collection name the adapters sowed into.

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
    if path and _ADAPTER_NAME.match(path[-1]) and per_parent[path[:-1]] == 1:
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
