"""Public drop-ins: ``compressed_conv`` and ``compressed_dense``."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowrank_vjp._src.methods import checkpoint as checkpointed
from lowrank_vjp._src.methods import base as config_lib
from lowrank_vjp._src.ops import conv_tucker as conv_rule
from lowrank_vjp._src.ops import conv as conv_spec_lib
from lowrank_vjp._src.tensor import hosvd as decompositions
from lowrank_vjp._src.ops import dot as dense_rule
from lowrank_vjp._src.methods import gradfilter as gradient_filter
from lowrank_vjp._src.measure import layer_log as layer_log
from lowrank_vjp._src.methods import quant as quantized
from lowrank_vjp._src.tensor import tucker as residuals
from lowrank_vjp._src.ops import sharding as sharding

CompressionConfig = config_lib.CompressionConfig
CompressionStats = residuals.CompressionStats


class RankOverflowWarning(UserWarning):
  """A layer kept less than ε because its static capacity was too small."""


class RankOverflowError(RuntimeError):
  """Raised (at run time) when ``on_overflow="error"`` and capacity is short."""


def _overflow_message(stats_np, shape, capacity, eps):
  needed = [int(n) for n in np.asarray(stats_np[0]).ravel()]
  energy = [round(float(e), 4) for e in np.asarray(stats_np[1]).ravel()]
  return (f"activation {shape}: eps={eps} needs ranks {needed} but the "
          f"capacity is {list(capacity)}; kept explained variance per mode "
          f"{energy} (< eps). Raise `ranks`/`rank_fraction`, or let the rank "
          "controller grow the capacity.")


def report_overflow(config: CompressionConfig,
                    stats: CompressionStats) -> None:
  """Warns or raises from the device on the steps where capacity is short."""
  if config.on_overflow == "ignore" or config.method == "none":
    return

  def callback(overflow, needed, energy):
    if not np.any(overflow):
      return
    msg = _overflow_message((needed, energy), stats.shape, stats.capacity,
                            config.eps)
    if config.on_overflow == "error":
      raise RankOverflowError(msg)
    warnings.warn(msg, RankOverflowWarning, stacklevel=2)

  jax.debug.callback(callback, stats.overflow, stats.needed_ranks,
                     stats.kept_energy)


def _uncompressed_stats(x, method="none", nbytes=None) -> CompressionStats:
  """Stats of a layer without ranks: shapes as ranks, ``nbytes`` saved."""
  n = x.ndim
  if nbytes is None:
    nbytes = int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
  return CompressionStats(
      needed_ranks=jnp.asarray(x.shape, jnp.int32),
      kept_ranks=jnp.asarray(x.shape, jnp.int32),
      kept_energy=jnp.ones((n,), jnp.float32),
      overflow=jnp.asarray(False),
      shape=tuple(x.shape), capacity=(None,) * n, method=method,
      itemsize=jnp.dtype(x.dtype).itemsize,
      residual_nbytes=int(nbytes))


def _compress(config: CompressionConfig, x, batch_axis: int):
  capacity = config.capacity(x.shape, batch_axis=batch_axis)
  res, stats = decompositions.tucker_compress(x, capacity, config.eps,
                                              config.method)
  report_overflow(config, stats)
  return res, stats


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bilinear(fn, lhs, rhs, res):
  del res
  return fn(lhs, rhs)


def _bilinear_fwd(fn, lhs, rhs, res):
  y = residuals.tie(fn(lhs, rhs), res)
  return y, (res, rhs, jnp.zeros((), lhs.dtype))


def _bilinear_bwd(fn, saved, g):
  res, rhs, lhs_dtype_probe = saved
  lhs_aval = jax.ShapeDtypeStruct(res.shape, lhs_dtype_probe.dtype)
  (dlhs,) = jax.linear_transpose(lambda l: fn(l, rhs), lhs_aval)(g)
  res = residuals.TuckerResidual(residuals.after(res.core, g), res.factors)
  lhs = res.reconstruct(dtype=lhs_dtype_probe.dtype)
  rhs_aval = jax.ShapeDtypeStruct(rhs.shape, rhs.dtype)
  (drhs,) = jax.linear_transpose(lambda r: fn(lhs, r), rhs_aval)(g)
  return dlhs, drhs, jax.tree_util.tree_map(jnp.zeros_like, res)


_bilinear.defvjp(_bilinear_fwd, _bilinear_bwd)


@dataclasses.dataclass(frozen=True)
class CompressedConv:
  """A drop-in for ``lax.conv_general_dilated`` that saves a compressed input.

  Create with :func:`compressed_conv`. Calling it runs the exact convolution;
  its VJP saves ``rhs`` and a :class:`TuckerResidual` of ``lhs``.

  Attributes:
    config: The compression settings.
  """

  config: CompressionConfig

  def __call__(self, lhs, rhs=None, window_strides=None, padding=None,
               *args, **kwargs) -> Any:
    """Same signature as ``lax.conv_general_dilated``; returns its output.

    Called with a single function instead, returns that function wrapped (the
    decorator form, see :func:`compressed_conv`).
    """
    if rhs is None and callable(lhs) and window_strides is None:
      return _decorate(self.config, lhs)
    if window_strides is None or padding is None:
      raise TypeError("compressed conv needs window_strides and padding, as "
                      "lax.conv_general_dilated does.")
    return self.with_stats(lhs, rhs, window_strides, padding, *args,
                           **kwargs)[0]

  def with_stats(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None,
                 feature_group_count=1, batch_group_count=1, precision=None,
                 preferred_element_type=None, out_sharding=None):
    """Like ``__call__``, also returning what the layer kept.

    Returns:
      ``(y, stats)``: the convolution's output and a
      :class:`CompressionStats` for this call.
    """
    args = (window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, batch_group_count,
            precision, preferred_element_type)
    spec = conv_spec_lib.conv_spec(lhs, rhs, *args, out_sharding)
    shards = (None if self.config.method == "none" else
              sharding.batch_shards(lhs, rhs, spec.batch_axis))
    if shards is None:
      return _conv_with_spec(self.config, spec, lhs, rhs)
    return sharding.per_shard(
        lambda l, r: _conv_with_spec(
            self.config, conv_spec_lib.conv_spec(l, r, *args), l, r),
        lhs, rhs, shards, spec.dimension_numbers.out_spec[0],
        len(spec.lhs_shape))


def _quant_spec(config: CompressionConfig, channel_axis: int):
  return quantized.QuantSpec(config.bits, config.per_channel,
                             config.stochastic, channel_axis)


def _other_method(config: CompressionConfig, spec, lhs, rhs,
                  channel_axis: int):
  """``(y, stats)`` for "quant" and "checkpoint" (any ``spec.apply``)."""
  if config.method == "quant":
    qspec = _quant_spec(config, channel_axis)
    return quantized.apply(spec, qspec, lhs, rhs), _uncompressed_stats(
        lhs, "quant", quantized.residual_nbytes(np.shape(lhs), qspec))
  assert config.method == "checkpoint", config.method
  return (checkpointed.apply(spec, lhs, rhs),
          _uncompressed_stats(lhs, "checkpoint"))


def _conv_with_spec(config, spec, lhs, rhs):
  y, stats = _run_conv(config, spec, lhs, rhs)
  layer_log.record("conv", config, spec, stats)
  return y, stats


def _run_conv(config, spec, lhs, rhs):
  if config.method == "none":
    return spec.apply(lhs, rhs), _uncompressed_stats(lhs)
  if config.method == "gradfilter":
    gradient_filter.check_supported(spec, config.radius)
    nbytes = gradient_filter.residual_nbytes(spec, config.radius)
    return (gradient_filter.conv(spec, config.radius, lhs, rhs),
            _uncompressed_stats(lhs, "gradfilter", nbytes))
  if config.method not in config_lib.TUCKER_METHODS:
    return _other_method(config, spec, lhs, rhs,
                         spec.dimension_numbers.lhs_spec[1])
  res, stats = _compress(config, lhs, spec.batch_axis)
  return conv_rule.conv(spec, lhs, rhs, res), stats


def _decorate(config: CompressionConfig, fn: Callable) -> Callable:
  """Wraps ``fn(x, w, *args, **kwargs)``, bilinear in ``(x, w)``."""

  def with_stats(x, w, *args, **kwargs):
    bound = fn if not (args or kwargs) else (
        lambda l, r: fn(l, r, *args, **kwargs))
    params = _single_conv_params(bound, x, w)
    if params is not None:
      spec = conv_spec_lib.conv_spec(x, w, **params)
      return _conv_with_spec(config, spec, x, w)
    conv_spec_lib._check_float("x", x)  # pylint: disable=protected-access
    conv_spec_lib._check_float("w", w)  # pylint: disable=protected-access
    if config.method == "none":
      return bound(x, w), _uncompressed_stats(x)
    if config.method == "gradfilter":
      raise ValueError(
          "method='gradfilter' needs the function to be exactly one "
          "lax.conv_general_dilated of (x, w) (it pools over the "
          f"convolution's output grid); {getattr(fn, '__name__', fn)!r} is "
          "not. Call the drop-in conv directly instead.")
    if config.method not in config_lib.TUCKER_METHODS:
      spec = quantized.BilinearSpec(bound, np.shape(x), jnp.result_type(x),
                                    np.shape(w), jnp.result_type(w))
      return _other_method(config, spec, x, w, np.ndim(x) - 1)
    res, stats = _compress(config, x, batch_axis=0)
    return _bilinear(bound, x, w, res), stats

  @functools.wraps(fn)
  def wrapped(x, w, *args, **kwargs):
    return with_stats(x, w, *args, **kwargs)[0]

  wrapped.with_stats = with_stats
  wrapped.config = config
  return wrapped


def compressed_conv(fn: Callable | None = None, *, method: str = "hosvd",
                    eps: float = 0.9, ranks=None, rank_fraction: float = 0.5,
                    on_overflow: str = "warn", radius: int = 2, bits: int = 8,
                    per_channel: bool = False, stochastic: bool = False):
  """A convolution whose saved activation is compressed.

  Use it as a drop-in for ``lax.conv_general_dilated``::

    conv = lv.compressed_conv(method="hosvd", eps=0.9)
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
    method: ``"hosvd"``, ``"svd"``, ``"none"``, ``"gradfilter"``
      (gradient filter, drop-in and single-conv functions only),
      ``"quant"`` (K-bit codes of the input) or ``"checkpoint"``
      (recompute from the saved input); docs/methods.md.
    eps: Explained variance kept per compressed mode, in ``(0, 1]``.
    ranks: Static rank capacity per axis of ``x`` (see
      :class:`CompressionConfig`).
    rank_fraction: Default capacity as a fraction of each axis.
    on_overflow: ``"warn"``, ``"error"`` or ``"ignore"`` when ε needs more
      than the capacity.
    radius: ``"gradfilter"``: patch size ``r`` of the output gradient.
    bits: ``"quant"``: 2, 4 or 8 bits per saved element.
    per_channel: ``"quant"``: one coding range per channel.
    stochastic: ``"quant"``: stochastic rounding.

  Returns:
    A :class:`CompressedConv` (or the decorated function, which also has a
    ``with_stats`` method).

  Raises:
    ValueError: for an unknown ``method`` or settings out of range.
  """
  config = CompressionConfig(method=method, eps=eps, ranks=ranks,
                             rank_fraction=rank_fraction,
                             on_overflow=on_overflow, radius=radius,
                             bits=bits, per_channel=per_channel,
                             stochastic=stochastic)
  if fn is not None:
    return _decorate(config, fn)
  return CompressedConv(config)


# ---------------------------------------------------------------- dense ---


@dataclasses.dataclass(frozen=True)
class CompressedDense:
  """A drop-in for ``lax.dot_general`` whose saved ``lhs`` is compressed.

  ``lhs`` is taken to be the activation (``[N, F]``, ``[N, T, F]``, …, batch
  first) and ``rhs`` the weight. Create with :func:`compressed_dense`.

  Attributes:
    config: The compression settings.
  """

  config: CompressionConfig

  def __call__(self, lhs, rhs, dimension_numbers, precision=None,
               preferred_element_type=None, *, out_sharding=None):
    """Same signature as ``lax.dot_general``; returns its output."""
    return self.with_stats(lhs, rhs, dimension_numbers, precision,
                           preferred_element_type,
                           out_sharding=out_sharding)[0]

  def with_stats(self, lhs, rhs, dimension_numbers, precision=None,
                 preferred_element_type=None, *, out_sharding=None):
    """Like ``__call__``, also returning a :class:`CompressionStats`."""
    spec = dense_rule.dot_spec(lhs, rhs, dimension_numbers, precision,
                               preferred_element_type, out_sharding)
    if self.config.method == "gradfilter":
      raise ValueError("method='gradfilter' applies to convolutions only; "
                       "use compressed_conv, or another method for dense "
                       "layers.")
    if self.config.method == "none":
      y, stats = spec.apply(lhs, rhs), _uncompressed_stats(lhs)
      layer_log.record("dense", self.config, spec, stats)
      return y, stats
    batch_axis = 0
    if spec.dimension_numbers[1][0]:
      batch_axis = spec.dimension_numbers[1][0][0]
    contracting = spec.dimension_numbers[0][0]
    channel_axis = contracting[-1] if contracting else len(spec.lhs_shape) - 1

    def run(l, r, spec):
      if self.config.method in config_lib.TUCKER_METHODS:
        res, stats = _compress(self.config, l, batch_axis)
        y = dense_rule.dot(spec, l, r, res)
      else:
        y, stats = _other_method(self.config, spec, l, r, channel_axis)
      layer_log.record("dense", self.config, spec, stats)
      return y, stats

    (lc, _), (lb, _) = spec.dimension_numbers
    shards = None if lb or batch_axis in lc else sharding.batch_shards(
        lhs, rhs, batch_axis)
    if shards is None:
      return run(lhs, rhs, spec)
    free = [a for a in range(len(spec.lhs_shape)) if a not in lc]
    out_ndim = len(free) + len(spec.rhs_shape) - len(lc)
    return sharding.per_shard(
        lambda l, r: run(l, r, dense_rule.dot_spec(
            l, r, dimension_numbers, precision, preferred_element_type)),
        lhs, rhs, shards, free.index(batch_axis), out_ndim)


def compressed_dense(*, method: str = "hosvd", eps: float = 0.9, ranks=None,
                     rank_fraction: float = 0.5, on_overflow: str = "warn",
                     radius: int = 2, bits: int = 8, per_channel: bool = False,
                     stochastic: bool = False) -> CompressedDense:
  """A ``lax.dot_general`` whose saved activation ``lhs`` is compressed.

  Example::

    dense = lv.compressed_dense(method="hosvd", eps=0.9)
    y = dense(x, w, (((x.ndim - 1,), (0,)), ((), ())))   # x: [N, T, F]

  Args: as :func:`compressed_conv` (``ranks`` in the order of ``lhs``'s axes;
  ``"gradfilter"`` is for convolutions only and raises ``ValueError`` here;
  ``"quant"``'s channel axis is ``lhs``'s last contracting axis).

  Returns:
    A :class:`CompressedDense`.
  """
  return CompressedDense(CompressionConfig(
      method=method, eps=eps, ranks=ranks, rank_fraction=rank_fraction,
      on_overflow=on_overflow, radius=radius, bits=bits,
      per_channel=per_channel, stochastic=stochastic))
