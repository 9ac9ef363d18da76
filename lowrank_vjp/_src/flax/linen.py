"""Linen modules: compressed convolutions and dense layers for Flax.

Linen's ``nn.Conv`` and ``nn.Dense`` build their contraction from a Module
class (``conv_general_dilated_cls`` / ``dot_general_cls``), instantiated with
no arguments inside the layer and called like the ``lax`` function. The two
Modules here do that for any :class:`lowrank_vjp.methods.Method`: they run
the compressed op and ``sow`` its :class:`CompressionStats` into a
collection (``"compression"`` by default), which the caller reads back with
``mutable=["compression"]``::

  conv = nn.Conv(32, (3, 3), conv_general_dilated_cls=lvf.conv_cls(eps=0.9))

A stateful method (ASI) keeps its state in a second collection
(``"asi_state"`` by default) that the training loop passes in and takes
back like ``"batch_stats"``.

NNX layers take the function itself, so the drop-ins plug in directly::

  conv = nnx.Conv(3, 32, (3, 3), conv_general_dilated=lv.compressed_conv(),
                  rngs=nnx.Rngs(0))
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import tracers as flax_tracers

from lowrank_vjp._src import dropins
from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src.control import scope
from lowrank_vjp._src.flax import stats as flax_stats
from lowrank_vjp._src.methods import base as methods_base
from lowrank_vjp._src.methods import hosvd as hosvd_method

Method = methods_base.Method
CompressionStats = stats_lib.CompressionStats
COLLECTION = flax_stats.COLLECTION

class StatsDroppedWarning(UserWarning):
  """A layer's statistics cannot reach the collection the caller asked for."""


ASI_COLLECTION = "asi_state"
"""Default name of the Linen collection holding stateful methods' state."""


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


def _layer_key(module: nn.Module) -> str:
  """The layer's name as :func:`collect_stats` reports it (trace time)."""
  path = tuple(str(p) for p in module.path)
  if path and flax_stats.MODULE_NAME.match(path[-1]):
    path = path[:-1]
  return "/".join(path)


def _path(module: nn.Module) -> str:
  return "/".join(map(str, module.path))


def _as_tree(state) -> dict[str, Any]:
  """A state as ``{field: value}`` variables (no None leaves)."""
  if dataclasses.is_dataclass(state):
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  return {"state": state}


def _from_tree(fresh, tree: dict[str, Any]):
  if dataclasses.is_dataclass(fresh):
    return type(fresh)(**tree)
  return tree["state"]


def _shapes(tree) -> Any:
  return jax.tree_util.tree_map(lambda v: tuple(jnp.shape(v)), tree)


class _ContractionModule(nn.Module):
  """What both Linen modules share: the method, the stats, the state."""

  method: Method = hosvd_method.Hosvd()
  collection: str = COLLECTION
  state_collection: str = ASI_COLLECTION

  def _run(self, drop_in, lhs, rhs, *args, **kwargs):
    method = scope.configured(self.method, _layer_key(self))
    drop_in = type(drop_in)(method)
    inner = _inner_transform(self)
    if not method.stateful:
      y, stats = drop_in.with_stats(lhs, rhs, *args, **kwargs)
    else:
      fresh = drop_in.init_state(lhs, rhs, *args, **kwargs)
      state, write = (fresh, False) if inner else self._read_state(fresh)
      y, stats, new_state = drop_in.with_state(lhs, rhs, *args, state=state,
                                               **kwargs)
      if write:
        for name, value in _as_tree(new_state).items():
          self.put_variable(self.state_collection, name, value)
    # Not during init: a "compression" collection returned by init and
    # merged into the variables would make every later apply append to it.
    if not inner and not self.is_initializing():
      if not self.is_mutable_collection(self.collection):
        self._warn_if_dropped()
      self.sow(self.collection, flax_stats.STATS, stats)
    return y

  def _warn_if_dropped(self) -> None:
    """Warns when an enclosing module could take the stats but this one can't.

    That happens inside a lifted transform (``nn.scan``, ``nn.vmap``, …)
    whose ``variable_axes`` omit the collection: the statistics would vanish
    and the rank controller would never see an overflow.
    """
    try:
      from flax.linen import module as linen_module  # pylint: disable=g-import-not-at-top
      stack = linen_module._context.module_stack  # pylint: disable=protected-access
      outer = any(m is not None and m.scope is not None
                  and m.scope.is_mutable_collection(self.collection)
                  for m in stack)
    except Exception:  # pylint: disable=broad-except  # Flax internals moved.
      return
    if outer:
      warnings.warn(
          f"{_layer_key(self) or type(self).__name__}: its compression "
          f"statistics are dropped: it runs inside a lifted transform "
          f"(nn.scan, nn.vmap, ...) whose variable_axes do not include "
          f"{self.collection!r}, although the enclosing apply made it "
          f"mutable. Add {self.collection!r}: 0 to variable_axes to keep "
          "them (the rank controller and overflow reports read them).",
          StatsDroppedWarning, stacklevel=3)

  def _read_state(self, fresh) -> tuple[Any, bool]:
    """``(state to use, whether to write the new one back)``."""
    col = self.state_collection
    mutable = self.is_mutable_collection(col)
    names = list(_as_tree(fresh))
    if not all(self.has_variable(col, n) for n in names):
      if not mutable:
        raise ValueError(
            f"{type(self).__name__} at {_path(self)!r} found no "
            f"{type(self.method).__name__} state in the {col!r} collection. "
            "Pass the "
            f"collection in the variables (from `init`, or from an `apply` "
            f"with mutable=[{col!r}]), or make it mutable.")
      for name, value in _as_tree(fresh).items():
        self.put_variable(col, name, value)
      return fresh, False   # created unstarted: the next call starts it
    stored = {n: self.get_variable(col, n) for n in names}
    want = _shapes(_as_tree(fresh))
    got = _shapes(stored)
    if got != want:
      raise ValueError(
          f"{self.method.label} state at {_path(self)!r} holds arrays of "
          f"shapes {got} but this input needs {want}; the input shape or the "
          "ranks changed since the state was created.")
    stored = jax.tree_util.tree_map(
        lambda v, f: jnp.asarray(v, f.dtype), stored, _as_tree(fresh))
    return _from_tree(fresh, stored), mutable


class CompressedConvGeneralDilated(_ContractionModule):
  """``lax.conv_general_dilated`` as a Linen Module that saves compressed input.

  Pass it (usually through :func:`conv_cls`) as ``conv_general_dilated_cls``
  of ``nn.Conv``. Each call runs :class:`lowrank_vjp.CompressedConv` with
  :attr:`method` and sows its :class:`CompressionStats` into ``collection``
  under ``"stats"`` (a tuple, one entry per call); the sow is a no-op unless
  ``collection`` is mutable, and is skipped when the call runs inside a raw
  JAX transform opened within the model (``nn.ConvLocal`` runs it under
  ``jax.eval_shape`` only to infer a shape). The module has no parameters.

  A stateful method's state (ASI's factors) lives in ``state_collection``,
  one variable per field (``"factors"``: ``{str(axis): [I_a, K_a]}``,
  ``"started"``: ``bool[]`` for ASI): plain arrays, Orbax-friendly. A call
  that creates it (``init``, or an ``apply`` whose variables lack it, with
  the collection mutable) stores it unstarted; a call that finds it reads
  it, and writes the new state back when the collection is mutable (when it
  is not, for example in evaluation, the state is only read: the forward
  pass is exact whatever it holds). A call that finds no state and cannot
  create it raises.

  Attributes:
    method: The compression method.
    collection: Linen collection the stats are sown into.
    state_collection: Linen collection of a stateful method's state.

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
      ValueError: for a stateful method whose state collection holds no
        state for this layer and is not mutable, or holds arrays of other
        shapes.
    """
    return self._run(
        dropins.CompressedConv(self.method), jnp.asarray(lhs), rhs,
        window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type, out_sharding)


class CompressedDotGeneral(_ContractionModule):
  """``lax.dot_general`` as a Linen Module that saves a compressed ``lhs``.

  Pass it (usually through :func:`dense_cls`) as ``dot_general_cls`` of
  ``nn.Dense`` or ``nn.DenseGeneral``. ``lhs`` is the activation (batch
  first), ``rhs`` the kernel. Stats and state as
  :class:`CompressedConvGeneralDilated`.

  Attributes:
    method: The compression method.
    collection: Linen collection the stats are sown into.
    state_collection: Linen collection of a stateful method's state.

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
    return self._run(dropins.CompressedDense(self.method), jnp.asarray(lhs),
                     rhs, dimension_numbers, precision,
                     preferred_element_type, out_sharding=out_sharding)


MODULES = (CompressedConvGeneralDilated, CompressedDotGeneral)
"""The library's Linen modules (their names: ``layer_log.MODULES``)."""

_MODULE_SETTINGS = ("collection", "state_collection")


class _ModuleFactory(functools.partial):
  """A ``functools.partial`` of a Linen module that refuses to be the op.

  ``nn.Conv`` / ``nn.Dense`` call it with no arguments to build the Linen module;
  a call with positional arguments means it was handed to something that
  wants the contraction itself (NNX's ``conv_general_dilated=``), which gets
  a clear error instead of a confusing Linen one.
  """

  def __call__(self, *args, **kwargs):
    if args:
      raise TypeError(
          f"lowrank_vjp.flax.conv_cls / dense_cls build a Linen module class "
          f"for nn.Conv(conv_general_dilated_cls=...) / "
          f"nn.Dense(dot_general_cls=...); it is not the contraction itself. "
          f"For NNX (nnx.Conv(conv_general_dilated=...), "
          f"nnx.Linear(dot_general=...)) or a direct call, pass "
          f"lv.compressed_conv(method=...) / lv.compressed_dense(method=...) "
          f"instead (here: {self.keywords.get('method')!r}).")
    return super().__call__(**kwargs)


def _partial(module_cls, method, settings) -> functools.partial:
  settings = dict(settings)
  module_kw = {k: settings.pop(k) for k in _MODULE_SETTINGS if k in settings}
  for name in module_kw:
    if not isinstance(module_kw[name], str) or not module_kw[name]:
      raise ValueError(f"{name} must be a non-empty collection name (a str), "
                       f"got {module_kw[name]!r}.")
  return _ModuleFactory(module_cls,
                        method=methods_base.resolve(method, **settings),
                        **module_kw)


def conv_cls(method: Method | str = "hosvd", **settings: Any
             ) -> functools.partial:
  """A ``conv_general_dilated_cls`` for ``nn.Conv`` with this method.

  Args:
    method: A :class:`lowrank_vjp.methods.Method`, or its shorthand.
    **settings: With a shorthand, the method's settings (``eps``, ``ranks``,
      …); also ``collection`` (default ``"compression"``) and
      ``state_collection`` (default ``"asi_state"``).

  Returns:
    ``functools.partial(CompressedConvGeneralDilated, method=...)``;
    ``nn.Conv`` instantiates it with no arguments.

  Raises:
    ValueError: for settings the method rejects.
    TypeError: for settings the method does not take.

  Example::

    import flax.linen as nn
    import lowrank_vjp as lv
    import lowrank_vjp.flax as lvf

    conv = nn.Conv(32, (3, 3), conv_general_dilated_cls=lvf.conv_cls(
        method="hosvd", eps=0.9))
    asi = nn.Conv(32, (3, 3), conv_general_dilated_cls=lvf.conv_cls(
        lv.methods.Asi(rank_fraction=0.25)))
  """
  return _partial(CompressedConvGeneralDilated, method, settings)


def dense_cls(method: Method | str = "hosvd", **settings: Any
              ) -> functools.partial:
  """A ``dot_general_cls`` for ``nn.Dense`` / ``nn.DenseGeneral``.

  Args:
    method: As :func:`conv_cls`.
    **settings: As :func:`conv_cls`.

  Returns:
    ``functools.partial(CompressedDotGeneral, method=...)``.

  Raises:
    ValueError: for settings the method rejects.
    TypeError: for settings the method does not take.

  Example::

    import flax.linen as nn
    import lowrank_vjp.flax as lvf

    dense = nn.Dense(10, dot_general_cls=lvf.dense_cls(method="svd", eps=0.8))
  """
  return _partial(CompressedDotGeneral, method, settings)
