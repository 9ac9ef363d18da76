"""The NNX modules :func:`lowrank_vjp.nnx.apply` plugs into a model.

* :class:`Contraction` takes the place of an ``nnx.Conv``'s
  ``conv_general_dilated`` or an ``nnx.Linear``'s ``dot_general`` (the
  hooks NNX offers for exactly this): it runs the compressed op and records
  its statistics (and a stateful method's state) in NNX variables of its
  own, so the layer's parameters stay where they are.
* :class:`TrainedBatchNorm` and :class:`FrozenBatchNorm` are ``nnx.BatchNorm``
  with the plan's mode: the first runs :func:`lowrank_vjp.batch_norm` (a
  small residual) with batch statistics when the model trains, the second
  always uses the running averages. ``apply`` switches a BatchNorm's class
  to one of them in place (same variables, same path) and back.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_vjp._src import dropins
from lowrank_vjp._src.control import scope
from lowrank_vjp._src.flax import linen as flax_linen
from lowrank_vjp._src.layers import batchnorm_train
from lowrank_vjp._src.methods import base as methods_base
from lowrank_vjp._src.nnx import variables

Method = methods_base.Method

_DROP_INS = {"conv": dropins.CompressedConv, "dense": dropins.CompressedDense}
_FRESH = threading.local()


@contextlib.contextmanager
def fresh_states() -> Iterator[dict[str, Any]]:
  """Collects ``{path: fresh state}`` of the stateful calls traced inside."""
  previous = getattr(_FRESH, "value", None)
  _FRESH.value = {}
  try:
    yield _FRESH.value
  finally:
    _FRESH.value = previous


class Contraction(nnx.Module):
  """A compressed ``lax.conv_general_dilated`` / ``lax.dot_general`` in NNX.

  Same call signature as the ``lax`` function it replaces. Each call runs
  :class:`lowrank_vjp.CompressedConv` (or ``CompressedDense``) with
  :attr:`method` at the capacity :func:`lowrank_vjp.rank_capacities` sets
  for :attr:`path`, and stores what the call kept in :attr:`stats`.

  Attributes:
    kind: ``"conv"`` or ``"dense"``.
    method: The compression method (static: a change retraces ``nnx.jit``).
    path: The layer's module path (``"features/17/conv/1/0"``): the key of
      its statistics and of the rank controller's capacities.
    original: The function this one replaced (restored by a later
      :func:`~lowrank_vjp.nnx.apply` that no longer compresses the layer).
    deterministic: True (``model.eval()`` sets it) runs :attr:`original`
      instead: the same exact output, with nothing compressed, recorded or
      carried (a stateful method's state is left as it is, whatever the
      batch).
    stats: :class:`~lowrank_vjp.nnx.Compression`, the last call's stats.
    method_state: :class:`~lowrank_vjp.nnx.MethodState` (stateful methods
      only, else None).
  """

  def __init__(self, kind: str, method: Method, path: str, original: Any):
    if kind not in _DROP_INS:
      raise ValueError(f"kind must be one of {sorted(_DROP_INS)}, got "
                       f"{kind!r}")
    self.kind = kind
    self.method = method
    self.path = path
    self.original = original
    self.deterministic = False
    self.stats = variables.Compression(None)
    self.method_state = (variables.MethodState(None) if method.stateful
                         else None)

  def _drop_in(self):
    return _DROP_INS[self.kind](scope.configured(self.method, self.path))

  def __call__(self, lhs, rhs, *args, **kwargs) -> jax.Array:
    """As the ``lax`` function; returns its exact output."""
    if self.deterministic:
      return self.original(lhs, rhs, *args, **kwargs)
    drop_in = self._drop_in()
    lhs = jnp.asarray(lhs)
    if not drop_in.method.stateful:
      y, stats = drop_in.with_stats(lhs, rhs, *args, **kwargs)
    else:
      fresh = drop_in.init_state(lhs, rhs, *args, **kwargs)
      if getattr(_FRESH, "value", None) is not None:
        _FRESH.value[self.path] = flax_linen._as_tree(fresh)  # pylint: disable=protected-access
      state = self._read_state(fresh)
      y, stats, new = drop_in.with_state(lhs, rhs, *args, state=state,
                                         **kwargs)
      if not self.deterministic:
        self.method_state.set_value(
            flax_linen._as_tree(new))  # pylint: disable=protected-access
    self.stats.set_value(stats)
    return y

  def _read_state(self, fresh):
    stored = self.method_state.get_value()
    tree = flax_linen._as_tree(fresh)  # pylint: disable=protected-access
    if stored is None:
      return fresh   # unstarted: this call runs the method's exact start
    got, want = flax_linen._shapes(stored), flax_linen._shapes(tree)  # pylint: disable=protected-access
    if got != want:
      raise ValueError(
          f"{self.method.label} state at {self.path!r} holds arrays of "
          f"shapes {got} but this input needs {want}; the input shape or the "
          "ranks changed since the state was created.")
    stored = jax.tree_util.tree_map(lambda v, f: jnp.asarray(v, f.dtype),
                                    stored, tree)
    return flax_linen._from_tree(fresh, stored)  # pylint: disable=protected-access


def _use_running_average(module: nnx.BatchNorm, value) -> bool:
  value = module.use_running_average if value is None else value
  if value is None:
    raise ValueError(
        f"BatchNorm at {module.lowrank_path!r}: no use_running_average was "
        "given to the call or the constructor.")
  return bool(value)


class FrozenBatchNorm(nnx.BatchNorm):
  """``nnx.BatchNorm`` that always uses its running averages (frozen).

  What a plan makes of every BatchNorm it does not train: the model may
  call it with ``use_running_average=False`` (it trains), the statistics
  stay as loaded and the backward keeps nothing.
  """

  def __call__(self, x, use_running_average=None, *, mask=None):
    return super().__call__(x, True, mask=mask)


class TrainedBatchNorm(nnx.BatchNorm):
  """``nnx.BatchNorm`` through :func:`lowrank_vjp.batch_norm`.

  Reads and writes ``nnx.BatchNorm``'s own variables (``scale``, ``bias``,
  ``mean``, ``var``); in training mode it keeps what :attr:`lowrank_method`
  keeps of ``x̂`` (None: the exact input) instead of autodiff's float32
  ``x − mean``, and stores that residual's stats in :attr:`lowrank_stats`.
  ``mask`` is not supported.

  Attributes (set by :func:`lowrank_vjp.nnx.apply`):
    lowrank_method: A stateless method, or None (exact).
    lowrank_path: The layer's path.
    lowrank_stats: :class:`~lowrank_vjp.nnx.Compression`.
  """

  def __call__(self, x, use_running_average=None, *, mask=None):
    if mask is not None:
      raise ValueError(f"BatchNorm at {self.lowrank_path!r}: mask is not "
                       "supported by the compressed BatchNorm.")
    if not getattr(self, "force_float32_reductions", True):
      raise ValueError(f"BatchNorm at {self.lowrank_path!r}: "
                       "force_float32_reductions=False is not supported by "
                       "the compressed BatchNorm.")
    x = jnp.asarray(x)
    axis = batchnorm_train.feature_axis(self, "axis", x.ndim)
    method = self.lowrank_method
    if method is not None:
      method = scope.configured(method, self.lowrank_path)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    kw = dict(axis=axis, epsilon=self.epsilon, method=method,
              axis_index_groups=self.axis_index_groups,
              use_fast_variance=self.use_fast_variance, dtype=self.dtype)
    if _use_running_average(self, use_running_average):
      y, _, _, stats = batchnorm_train.batch_norm_with_stats(
          x, scale, bias, mean=self.mean[...], var=self.var[...], **kw)
    else:
      y, mean, var, stats = batchnorm_train.batch_norm_with_stats(
          x, scale, bias, axis_name=self.axis_name, **kw)
      m = self.momentum
      self.mean[...] = jax.lax.stop_gradient(m * self.mean[...]
                                             + (1 - m) * mean)
      self.var[...] = jax.lax.stop_gradient(m * self.var[...]
                                            + (1 - m) * var)
    self.lowrank_stats.set_value(stats)
    return y
