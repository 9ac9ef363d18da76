"""Public drop-ins: ``compressed_conv`` and ``compressed_dense``.

Each resolves its ``method`` once (a :class:`~lowrank_vjp.methods.Method`
value, or the string shorthand with its settings) and, per call, resolves
the ``lax`` arguments into an op, then runs :func:`run`: per-device when the
batch is sharded over mesh axes, through the method's ``apply`` (the one
custom VJP for every compressing method), and logged for the memory report.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src.measure import layer_log
from lowrank_vjp._src.methods import base as methods_base
from lowrank_vjp._src.ops import bilinear as bilinear_lib
from lowrank_vjp._src.ops import conv as conv_lib
from lowrank_vjp._src.ops import dot as dot_lib
from lowrank_vjp._src.ops import sharding

Method = methods_base.Method
CompressionStats = stats_lib.CompressionStats


def _check_state(method: Method, state: Any, where: str) -> None:
  if method.stateful and state is None:
    raise TypeError(
        f"method {method!r} carries state from step to step, so {where} "
        "cannot run it: call `.with_state(..., state=state)` with the state "
        "from `.init_state(...)` (same arguments as the call) and keep the "
        "new state it returns, or use the Flax modules "
        "(lowrank_vjp.flax.conv_cls / dense_cls), which keep it in a "
        "variable collection. (NNX layers call the drop-in without a state: "
        "use a stateless method there.)")
  if not method.stateful and state is not None:
    raise TypeError(f"method {method!r} has no state; got state={state!r}.")


def _apply_and_record(op, method: Method, lhs, rhs, state):
  if not math.prod(op.lhs_shape) or not math.prod(op.rhs_shape):
    # An empty operand: nothing to compress, and JAX's own (zero) gradients.
    y, stats, new_state = op.apply(lhs, rhs), stats_lib.uncompressed(
        op.lhs_shape, op.lhs_dtype, method.label, 0), state
  else:
    y, stats, new_state = method.apply(op, lhs, rhs, state)
  layer_log.record(op, method, stats)
  return y, stats, new_state


def run(op, method: Method, lhs, rhs, state: Any = None, *,
        local_op: Callable | None = None, out_batch_axis: int | None = None,
        out_ndim: int | None = None):
  """Runs ``op`` with ``method``: ``(y, stats, new_state)``.

  Args:
    op: The resolved op (``ConvSpec``, ``DotSpec``, ``BilinearSpec``).
    method: The compression method.
    lhs: The activation.
    rhs: The weight.
    state: The method's state (stateful methods only).
    local_op: ``(l, r) -> op`` for per-device shards; None disables the
      per-device path.
    out_batch_axis: The output's batch axis (per-device path).
    out_ndim: The output's rank (per-device path).

  Returns:
    The op's output, its :class:`CompressionStats` (with a leading device
    axis on the per-device path) and the method's new state.
  """
  method.check_op(op)
  if method.stateful:
    method.check_state(op, state)
  shards = None
  if local_op is not None and method.per_shard and not method.stateful:
    shards = sharding.batch_shards(lhs, rhs, op.batch_axis)
  if shards is None:
    return _apply_and_record(op, method, lhs, rhs, state)
  y, stats = sharding.per_shard(
      lambda l, r: _apply_and_record(local_op(l, r), method, l, r, None)[:2],
      lhs, rhs, shards, out_batch_axis, out_ndim)
  return y, stats, None


# ----------------------------------------------------------------- conv ---


def _single_conv_params(fn, lhs, rhs):
  """Parameters of ``fn`` if it is exactly one ``conv_general_dilated(x, w)``."""
  closed = jax.make_jaxpr(fn)(
      jax.ShapeDtypeStruct(np.shape(lhs), jnp.result_type(lhs)),
      jax.ShapeDtypeStruct(np.shape(rhs), jnp.result_type(rhs)))
  jaxpr = closed.jaxpr
  while (len(jaxpr.eqns) == 1 and "jaxpr" in jaxpr.eqns[0].params
         and list(jaxpr.eqns[0].invars) == list(jaxpr.invars)
         and list(jaxpr.eqns[0].outvars) == list(jaxpr.outvars)):
    inner = jaxpr.eqns[0].params["jaxpr"]
    jaxpr = getattr(inner, "jaxpr", inner)
  if len(jaxpr.eqns) != 1:
    return None
  eqn = jaxpr.eqns[0]
  if (eqn.primitive.name != "conv_general_dilated"
      or list(eqn.invars) != list(jaxpr.invars)
      or list(eqn.outvars) != list(jaxpr.outvars)):
    return None
  keys = ("window_strides", "padding", "lhs_dilation", "rhs_dilation",
          "dimension_numbers", "feature_group_count", "batch_group_count",
          "precision", "preferred_element_type")
  return {k: eqn.params[k] for k in keys if k in eqn.params}


_CONV_ARGS = ("window_strides", "padding", "lhs_dilation", "rhs_dilation",
              "dimension_numbers", "feature_group_count", "batch_group_count",
              "precision", "preferred_element_type", "out_sharding")


def _conv_kwargs(args, kwargs) -> dict[str, Any]:
  """``lax.conv_general_dilated``'s arguments after ``rhs``, by name."""
  if len(args) > len(_CONV_ARGS):
    raise TypeError(f"conv takes at most {len(_CONV_ARGS)} arguments after "
                    f"rhs; got {len(args)}.")
  named = dict(zip(_CONV_ARGS, args))
  twice = sorted(set(named) & set(kwargs))
  if twice:
    raise TypeError(f"conv got multiple values for {twice}.")
  unknown = sorted(set(kwargs) - set(_CONV_ARGS))
  if unknown:
    raise TypeError(f"conv got unexpected keyword arguments {unknown}; "
                    f"lax.conv_general_dilated takes {list(_CONV_ARGS)}.")
  return {**named, **kwargs}


@dataclasses.dataclass(frozen=True)
class CompressedConv:
  """A drop-in for ``lax.conv_general_dilated`` that saves a compressed input.

  Create with :func:`compressed_conv`. Calling it runs the exact convolution;
  its VJP saves ``rhs`` and what :attr:`method` keeps of ``lhs``.

  Attributes:
    method: The compression method.
  """

  method: Method

  def __call__(self, lhs, rhs=None, window_strides=None, padding=None,
               *args, **kwargs) -> Any:
    """Same signature as ``lax.conv_general_dilated``; returns its output.

    Called with a single function instead, returns that function wrapped (the
    decorator form, see :func:`compressed_conv`).
    """
    if rhs is None and callable(lhs) and window_strides is None:
      return _decorate(self.method, lhs)
    _check_state(self.method, None, "a plain call")
    return self.with_stats(lhs, rhs, window_strides, padding, *args,
                           **kwargs)[0]

  def op(self, lhs, rhs, *args, **kwargs) -> conv_lib.ConvSpec:
    """The resolved :class:`ConvSpec` of a call with these arguments."""
    kw = _conv_kwargs(args, kwargs)
    if kw.get("window_strides") is None or kw.get("padding") is None:
      raise TypeError("compressed conv needs window_strides and padding, as "
                      "lax.conv_general_dilated does.")
    return conv_lib.conv_spec(lhs, rhs, **kw)

  def with_stats(self, lhs, rhs, window_strides=None, padding=None, *args,
                 **kwargs):
    """Like ``__call__``, also returning what the layer kept.

    Returns:
      ``(y, stats)``: the convolution's output and a
      :class:`CompressionStats` for this call.
    """
    _check_state(self.method, None, "with_stats")
    return self.with_state(lhs, rhs, window_strides, padding, *args,
                           **kwargs)[:2]

  def with_state(self, lhs, rhs, window_strides=None, padding=None, *args,
                 state: Any = None, **kwargs):
    """Like :meth:`with_stats`, carrying a stateful method's state.

    Returns:
      ``(y, stats, new_state)``.
    """
    _check_state(self.method, state, "with_state without a state")
    kw = _conv_kwargs((window_strides, padding) + args, kwargs)
    spec = self.op(lhs, rhs, **kw)
    local = {k: v for k, v in kw.items() if k != "out_sharding"}
    return run(
        spec, self.method, lhs, rhs, state,
        local_op=lambda l, r: self.op(l, r, **local),
        out_batch_axis=spec.dimension_numbers.out_spec[0],
        out_ndim=len(spec.lhs_shape))

  def init_state(self, lhs, rhs, window_strides=None, padding=None, *args,
                 **kwargs) -> Any:
    """The method's initial state for a call with these arguments."""
    return self.method.init_state(
        self.op(lhs, rhs, window_strides, padding, *args, **kwargs))


def _decorate(method: Method, fn: Callable) -> Callable:
  """Wraps ``fn(x, w, *args, **kwargs)``, bilinear in ``(x, w)``."""

  def op(x, w, *args, **kwargs):
    bound = fn if not (args or kwargs) else (
        lambda l, r: fn(l, r, *args, **kwargs))
    params = _single_conv_params(bound, x, w)
    if params is not None:
      return conv_lib.conv_spec(x, w, **params)
    return bilinear_lib.bilinear_spec(bound, x, w)

  def with_state(x, w, *args, state=None, **kwargs):
    _check_state(method, state, "with_state without a state")
    return run(op(x, w, *args, **kwargs), method, x, w, state)

  def with_stats(x, w, *args, **kwargs):
    _check_state(method, None, "with_stats")
    return with_state(x, w, *args, **kwargs)[:2]

  @functools.wraps(fn)
  def wrapped(x, w, *args, **kwargs):
    return with_stats(x, w, *args, **kwargs)[0]

  wrapped.with_stats = with_stats
  wrapped.with_state = with_state
  wrapped.init_state = lambda x, w, *a, **k: method.init_state(op(x, w, *a,
                                                                 **k))
  wrapped.method = method
  return wrapped


def compressed_conv(fn: Callable | None = None, *,
                    method: Method | str = "hosvd", **settings: Any):
  """A convolution whose saved activation is compressed.

  Use it as a drop-in for ``lax.conv_general_dilated``::

    conv = lv.compressed_conv(method=lv.methods.Hosvd(eps=0.9))
    conv = lv.compressed_conv(method="hosvd", eps=0.9)     # the same
    y = conv(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  or as a decorator of a function ``f(x, w, ...)`` that is linear in ``x``
  and in ``w`` (a convolution)::

    @lv.compressed_conv(method="svd", eps=0.8)
    def my_conv(x, w):
      return lax.conv_general_dilated(x, w, (2, 2), "VALID")

  When the decorated function is exactly one ``lax.conv_general_dilated`` of
  ``(x, w)`` it gets the same low-rank backward as the drop-in; otherwise the
  weight gradient is the transpose of ``f`` at the rebuilt activation (the
  residual is still compressed; only the backward is slower).

  Args:
    fn: Optional function to decorate (``compressed_conv(f, eps=...)``).
    method: A :class:`lowrank_vjp.methods.Method`, or its shorthand
      (``"hosvd"``, ``"svd"``, ``"asi"``, ``"quant"``, ``"gradfilter"``,
      ``"checkpoint"``, ``"none"``); docs/methods.md.
    **settings: With a shorthand, the method's settings (``eps=0.9``,
      ``bits=4``, …).

  Returns:
    A :class:`CompressedConv` (or the decorated function, which also has
    ``with_stats``, ``with_state`` and ``init_state``).

  Raises:
    TypeError: for a setting the method does not take.
    ValueError: for an unknown method or settings out of range.
  """
  method = methods_base.resolve(method, **settings)
  if fn is not None:
    return _decorate(method, fn)
  return CompressedConv(method)


# ---------------------------------------------------------------- dense ---


@dataclasses.dataclass(frozen=True)
class CompressedDense:
  """A drop-in for ``lax.dot_general`` whose saved ``lhs`` is compressed.

  ``lhs`` is taken to be the activation (``[N, F]``, ``[N, T, F]``, …, batch
  first) and ``rhs`` the weight. Create with :func:`compressed_dense`.

  Attributes:
    method: The compression method.
  """

  method: Method

  def __call__(self, lhs, rhs, dimension_numbers, precision=None,
               preferred_element_type=None, *, out_sharding=None):
    """Same signature as ``lax.dot_general``; returns its output."""
    _check_state(self.method, None, "a plain call")
    return self.with_stats(lhs, rhs, dimension_numbers, precision,
                           preferred_element_type,
                           out_sharding=out_sharding)[0]

  def op(self, lhs, rhs, dimension_numbers, precision=None,
         preferred_element_type=None, *, out_sharding=None
         ) -> dot_lib.DotSpec:
    """The resolved :class:`DotSpec` of a call with these arguments."""
    return dot_lib.dot_spec(lhs, rhs, dimension_numbers, precision,
                            preferred_element_type, out_sharding)

  def with_stats(self, lhs, rhs, dimension_numbers, precision=None,
                 preferred_element_type=None, *, out_sharding=None):
    """Like ``__call__``, also returning a :class:`CompressionStats`."""
    _check_state(self.method, None, "with_stats")
    return self.with_state(lhs, rhs, dimension_numbers, precision,
                           preferred_element_type,
                           out_sharding=out_sharding)[:2]

  def with_state(self, lhs, rhs, dimension_numbers, precision=None,
                 preferred_element_type=None, *, state: Any = None,
                 out_sharding=None):
    """Like :meth:`with_stats`, carrying a stateful method's state.

    Returns:
      ``(y, stats, new_state)``.
    """
    _check_state(self.method, state, "with_state without a state")
    spec = self.op(lhs, rhs, dimension_numbers, precision,
                   preferred_element_type, out_sharding=out_sharding)
    (lc, _), (lb, _) = spec.dimension_numbers
    batch_axis = spec.batch_axis
    if lb or batch_axis in lc:
      return run(spec, self.method, lhs, rhs, state)
    free = [a for a in range(len(spec.lhs_shape)) if a not in lc]
    return run(
        spec, self.method, lhs, rhs, state,
        local_op=lambda l, r: self.op(l, r, dimension_numbers, precision,
                                      preferred_element_type),
        out_batch_axis=free.index(batch_axis),
        out_ndim=len(free) + len(spec.rhs_shape) - len(lc))

  def init_state(self, lhs, rhs, dimension_numbers, precision=None,
                 preferred_element_type=None, *, out_sharding=None) -> Any:
    """The method's initial state for a call with these arguments."""
    return self.method.init_state(self.op(
        lhs, rhs, dimension_numbers, precision, preferred_element_type,
        out_sharding=out_sharding))


def compressed_dense(*, method: Method | str = "hosvd",
                     **settings: Any) -> CompressedDense:
  """A ``lax.dot_general`` whose saved activation ``lhs`` is compressed.

  Example::

    dense = lv.compressed_dense(method=lv.methods.Hosvd(eps=0.9))
    y = dense(x, w, (((x.ndim - 1,), (0,)), ((), ())))   # x: [N, T, F]

  Args: as :func:`compressed_conv` (``ranks`` in the order of ``lhs``'s axes;
  ``"gradfilter"`` is for convolutions only and raises ``ValueError`` here;
  ``"quant"``'s channel axis is ``lhs``'s last contracting axis).

  Returns:
    A :class:`CompressedDense`.
  """
  return CompressedDense(methods_base.resolve(method, **settings))
