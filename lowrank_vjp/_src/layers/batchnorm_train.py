"""BatchNorm that trains with a small residual: statistics plus a coded x̂.

Flax's ``nn.BatchNorm`` leaves its backward pass to autodiff, which keeps
``x - mean`` in float32 (full size) and more, even when the layers around it
keep compressed residuals. Here the backward pass is written out. With
``x̂ = (x - μ) · r``, ``r = 1 / sqrt(σ² + ε)`` and ``y = x̂ · γ + β`` (per
channel, ``M`` elements per channel)::

  dβ = Σ g        dγ = Σ g · x̂
  dx = r · γ · (g - dβ / M - x̂ · dγ / M)      (batch statistics)
  dx = r · γ · g                              (running averages)

so the only activation it needs is ``x̂``, and only for ``dγ`` and the last
term of ``dx``. What is kept of it is a method's residual:

* ``method=None`` (exact): the input ``x`` itself in its own dtype, from
  which ``x̂`` is recomputed; values and gradients equal ``nn.BatchNorm``'s
  to float32 round-off.
* any stateless :class:`lowrank_vjp.methods.Method`: its residual of ``x̂``
  (``"quant"``: 8- or 4-bit codes per channel, a quarter or an eighth of a
  float32 input; ``"hosvd"``: a Tucker core and factors). ``dγ`` and the
  batch-statistics ``dx`` are then taken at the rebuilt ``x̂`` and are
  approximate; with running averages ``dx`` stays exact. docs/memory.md
  gives the measured errors.

The op a method sees is :class:`NormScale` (``y = x̂ · γ``, kind
``"norm"``), so methods that only apply to convolutions (``"gradfilter"``)
refuse it at trace time, and stateful ones (``"asi"``) are refused here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lowrank_vjp._src import remat
from lowrank_vjp._src import schedule
from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src.control import scope
from lowrank_vjp._src.flax import stats as flax_stats
from lowrank_vjp._src.methods import base as methods_base
from lowrank_vjp._src.ops import base

EXACT_LABEL = "exact"
"""``method`` field of the statistics of an exact (uncompressed) BatchNorm."""



@dataclasses.dataclass(frozen=True)
class NormScale(base.Op):
  """``y = x̂ · γ`` per channel: a BatchNorm as the op a method compresses for.

  ``lhs`` is the normalised activation ``x̂``, ``rhs`` the scale ``γ``
  (``[C]``); its weight gradient is ``dγ = Σ g · x̂``.
  """

  lhs_shape: tuple[int, ...]
  lhs_dtype: Any
  rhs_shape: tuple[int, ...]
  rhs_dtype: Any
  axis: int
  lhs_manual: Any = None
  rhs_manual: Any = None

  kind = "norm"

  @property
  def batch_axis(self) -> int:
    return 1 if self.axis == 0 and len(self.lhs_shape) > 1 else 0

  @property
  def channel_axis(self) -> int:
    return self.axis

  def apply(self, lhs, rhs, **overrides) -> jax.Array:
    del overrides
    return lhs * _per_channel(rhs, len(self.lhs_shape), self.axis).astype(
        lhs.dtype)


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """Static settings of one normalisation (hashable, ``nondiff_argnums``).

  Batch, layer and RMS normalisation differ only in :attr:`reduce` (the
  axes the statistics average over) and :attr:`use_mean`; the affine
  parameters always live on ``op.axis``.
  """

  op: NormScale
  method: methods_base.Method | None
  epsilon: float
  batch_stats: bool
  axis_name: Any
  axis_index_groups: Any
  fast_variance: bool
  out_dtype: Any
  reduce: tuple[int, ...]   # the axes the statistics average over
  use_mean: bool = True     # False: RMS normalisation (no centring)

  @property
  def param_sum_axes(self) -> tuple[int, ...]:
    """The axes the scale's and bias's gradients sum over."""
    return tuple(a for a in range(len(self.op.lhs_shape))
                 if a != self.op.axis)


def _per_channel(v, ndim: int, axis: int):
  shape = [1] * ndim
  shape[axis] = -1
  return jnp.reshape(v, shape)


def _pmean(spec: NormSpec, *xs):
  if spec.axis_name is None:
    return xs
  stacked = lax.pmean(jnp.stack(xs), spec.axis_name,
                      axis_index_groups=spec.axis_index_groups)
  return tuple(stacked[i] for i in range(len(xs)))


def _count(spec: NormSpec) -> int:
  """Elements per statistic on this device (they average over all)."""
  return math.prod(spec.op.lhs_shape[a] for a in spec.reduce)


def _stat_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


def _batch_stats(spec: NormSpec, x):
  """Mean and (biased) variance, as Flax's normalisation layers compute."""
  xs = x.astype(_stat_dtype(x))
  red = spec.reduce
  if not spec.use_mean:
    (ms,) = _pmean(spec, lax.square(xs).mean(red))
    return jnp.zeros_like(ms), ms
  if spec.fast_variance:
    mu, mu2 = _pmean(spec, xs.mean(red), lax.square(xs).mean(red))
    return mu, jnp.maximum(0.0, mu2 - lax.square(mu))
  (mu,) = _pmean(spec, xs.mean(red))
  centred = xs - jnp.expand_dims(mu, red)
  (var,) = _pmean(spec, lax.square(centred).mean(red))
  return mu, var


def _affine_output(spec: NormSpec, x, mean, var, scale, bias):
  """Flax's normalised output, with its operations in its order."""
  red = spec.reduce
  mean_b = jnp.expand_dims(mean, red)
  rstd_b = lax.rsqrt(jnp.expand_dims(var, red) + spec.epsilon)
  y = (x - mean_b) * (rstd_b * _per_channel(scale, x.ndim, spec.op.axis))
  y = y + _per_channel(bias, x.ndim, spec.op.axis)
  return jnp.asarray(y, spec.out_dtype), mean_b, rstd_b


def _forward(spec: NormSpec, x, scale, bias, mean, var):
  if spec.batch_stats:
    mean, var = _batch_stats(spec, x)
  y, mean_b, rstd_b = _affine_output(spec, x, mean, var, scale, bias)
  if spec.method is None:
    res = x
    stats = stats_lib.uncompressed(x.shape, x.dtype, EXACT_LABEL)
  else:
    xhat = ((x - mean_b) * rstd_b).astype(x.dtype)
    res, stats, _ = spec.method.compress_for(
        spec.op, lax.stop_gradient(xhat), None)
  return y, mean, var, stats, res, mean_b, rstd_b


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def normalize(spec: NormSpec, x, scale, bias, mean, var):
  y, mean, var, stats, *_ = _forward(spec, x, scale, bias, mean, var)
  return y, mean, var, stats


def _normalize_fwd(spec, x, scale, bias, mean, var):
  y, mean, var, stats, res, mean_b, rstd_b = _forward(
      spec, x, scale, bias, mean, var)
  res = remat.named(res)
  y = schedule.tie(y, res)
  saved = (res, remat.named(mean_b), remat.named(rstd_b),
           remat.named(scale))
  return (y, mean, var, stats), saved


def _normalize_bwd(spec, saved, cotangents):
  res, mean_b, rstd_b, scale = saved
  gy, gmean, gvar = cotangents[:3]
  g = gy.astype(rstd_b.dtype)
  res = jax.tree_util.tree_map(lambda r: schedule.after(r, g), res)
  if spec.method is None:
    xhat = (res - mean_b) * rstd_b
  else:
    xhat = spec.method.rebuild(spec.op, res).astype(rstd_b.dtype)
  red = spec.reduce
  dbias = g.sum(spec.param_sum_axes)
  dscale = (g * xhat).sum(spec.param_sum_axes)
  scale_b = _per_channel(scale, g.ndim, spec.op.axis)
  if spec.batch_stats:
    # Means over every device: pmean of the local sums, over local counts.
    m = _count(spec)
    dxhat = g * scale_b
    if red == spec.param_sum_axes:   # BatchNorm: the same sums, scaled
      sums = (scale * dbias, scale * dscale)
    else:
      sums = (dxhat.sum(red), (dxhat * xhat).sum(red))
    s1, s2, tmean, tvar = (jnp.expand_dims(t, red)
                           for t in _pmean(spec, *sums, gmean, gvar))
    centre = s1 / m if spec.use_mean else 0.0
    dx = rstd_b * (dxhat - centre - xhat * (s2 / m))
    dx = dx + xhat * (2.0 * tvar / m) / rstd_b
    if spec.use_mean:
      dx = dx + tmean / m
    dmean = dvar = None
  else:
    dx = g * (rstd_b * scale_b)
    dmean, dvar = jnp.zeros_like(gmean), jnp.zeros_like(gvar)
  manual = spec.op.rhs_manual
  dscale = base.match_varying(dscale.astype(scale.dtype), manual)
  dbias = base.match_varying(dbias.astype(scale.dtype), manual)
  dx = base.match_varying(dx.astype(spec.op.lhs_dtype), spec.op.lhs_manual)
  return dx, dscale, dbias, dmean, dvar


normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _check_param(where, name, v, c, axis, x_shape):
  if v is not None and jnp.shape(v) != (c,):
    raise ValueError(
        f"{where}: {name} must have shape ({c},) (axis {axis} of x with "
        f"shape {x_shape}); got {jnp.shape(v)}.")


def _axis(where, name, axis, ndim, shape) -> int:
  if isinstance(axis, bool) or not isinstance(axis, int) or not (
      -ndim <= axis < ndim):
    raise ValueError(f"{where}: {name} must be an int in [{-ndim}, {ndim}) "
                     f"for x with shape {shape}; got {axis!r}.")
  return axis % ndim


def normalization_with_stats(
    where: str, x, scale, bias, *, axis: int, reduce, use_mean: bool = True,
    mean=None, var=None, epsilon: float, method: Any = None,
    axis_name: Any = None, axis_index_groups: Any = None,
    use_fast_variance: bool = True, dtype: Any = None
) -> tuple[jax.Array, jax.Array, jax.Array, stats_lib.CompressionStats]:
  """Batch, layer or RMS normalisation through :func:`normalize`.

  Args:
    where: The public name, for error messages.
    x: The activation.
    scale, bias: ``[C]`` on ``axis``, or None.
    axis: The axis of the affine parameters.
    reduce: The axes the statistics average over (int or tuple), or None
      for every axis but ``axis`` (BatchNorm).
    use_mean: Centre (False: RMS normalisation).
    mean, var: Fixed statistics (both or neither; BatchNorm's running
      averages), shaped like the statistics.
    epsilon, method, axis_name, axis_index_groups, use_fast_variance,
    dtype: As :func:`batch_norm`.

  Returns:
    ``(y, mean, var, stats)``.
  """
  x = jnp.asarray(x)
  base.check_float("x", x)
  if x.ndim < 1:
    raise ValueError(f"{where}: x must have at least one axis; got a scalar.")
  axis = _axis(where, "axis", axis, x.ndim, x.shape)
  if reduce is None:
    reduce = tuple(a for a in range(x.ndim) if a != axis)
  else:
    reduce = (reduce,) if isinstance(reduce, int) else tuple(reduce)
    reduce = tuple(sorted({_axis(where, "reduction_axes", a, x.ndim, x.shape)
                           for a in reduce}))
  c = x.shape[axis]
  for name, v in (("scale", scale), ("bias", bias)):
    _check_param(where, name, v, c, axis, x.shape)
  stat_shape = tuple(d for a, d in enumerate(x.shape) if a not in reduce)
  for name, v in (("mean", mean), ("var", var)):
    if v is not None and jnp.shape(v) != stat_shape:
      raise ValueError(f"{where}: {name} must have shape {stat_shape}; got "
                       f"{jnp.shape(v)}.")
  if (mean is None) != (var is None):
    raise ValueError(f"{where}: give both mean and var (running averages) "
                     "or neither (batch statistics).")
  epsilon = methods_base.concrete_number("epsilon", epsilon, where)
  if not epsilon > 0:
    raise ValueError(f"{where}: epsilon must be > 0, got {epsilon}.")
  params = [jnp.asarray(v) for v in (scale, bias) if v is not None]
  out_dtype = (jnp.dtype(dtype) if dtype is not None
               else jnp.result_type(x, *params))
  stat = _stat_dtype(x)
  scale_ = (jnp.ones((c,), stat) if scale is None else jnp.asarray(scale))
  bias_ = (jnp.zeros((c,), stat) if bias is None else jnp.asarray(bias))
  op = NormScale(tuple(x.shape), x.dtype, (c,), scale_.dtype, axis,
                 base.manual_axis_type(x), base.manual_axis_type(scale_))
  method = methods_base.resolve_stateless(method, where)
  if method is not None:
    method.check_op(op)
  spec = NormSpec(op, method, epsilon, mean is None, axis_name,
                  axis_index_groups, bool(use_fast_variance), out_dtype,
                  reduce, bool(use_mean))
  if mean is None:
    mean_in = var_in = jnp.zeros(stat_shape, stat)
  else:
    mean_in = lax.stop_gradient(jnp.asarray(mean, stat))
    var_in = lax.stop_gradient(jnp.asarray(var, stat))
  y, mean, var, stats = normalize(spec, x, scale_, bias_, mean_in, var_in)
  if method is not None:
    method.report(stats)   # e.g. a Tucker method's on_overflow
  return y, mean, var, stats


def batch_norm_with_stats(
    x: jax.typing.ArrayLike, scale=None, bias=None, *, mean=None, var=None,
    axis: int = -1, epsilon: float = 1e-5, method: Any = None,
    axis_name: Any = None, axis_index_groups: Any = None,
    use_fast_variance: bool = True, dtype: Any = None
) -> tuple[jax.Array, jax.Array, jax.Array, stats_lib.CompressionStats]:
  """:func:`batch_norm`, also returning the residual's statistics."""
  return normalization_with_stats(
      "batch_norm", x, scale, bias, axis=axis, reduce=None, mean=mean,
      var=var, epsilon=epsilon, method=method, axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      use_fast_variance=use_fast_variance, dtype=dtype)


def batch_norm(x: jax.typing.ArrayLike, scale: jax.typing.ArrayLike | None,
               bias: jax.typing.ArrayLike | None, *, mean=None, var=None,
               axis: int = -1, epsilon: float = 1e-5, method: Any = None,
               axis_name: Any = None, axis_index_groups: Any = None,
               use_fast_variance: bool = True, dtype: Any = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BatchNorm whose backward pass keeps a method's residual of ``x̂``.

  Args:
    x: Activation, e.g. ``[N, H, W, C]``, floating.
    scale, bias: ``[C]`` affine parameters (``γ``, ``β``), or None for none.
    mean, var: Running averages ``[C]`` to normalise with (not
      differentiated); None (both) uses the batch statistics.
    axis: The channel axis of ``x``.
    epsilon: Added to the variance, ``> 0``.
    method: What is kept of ``x̂``: None keeps ``x`` (exact); otherwise a
      stateless :class:`lowrank_vjp.methods.Method` or shorthand
      (``"quant"`` for 8-bit codes, ``lv.methods.Quant(bits=4)``,
      ``"hosvd"``); ``"none"`` and ``"checkpoint"`` mean exact.
    axis_name, axis_index_groups: As ``nn.BatchNorm``: average the batch
      statistics over a named (``pmap`` / ``shard_map`` / ``vmap``) axis.
    use_fast_variance: ``E[x²] - E[x]²`` (True, Flax's default) or
      ``E[(x - E[x])²]``.
    dtype: Output dtype; by default that of ``x``, ``scale`` and ``bias``
      together (as ``nn.BatchNorm``).

  Returns:
    ``(y, mean, var)``: the normalised activation and the statistics used
    (the batch's, float32, for the caller's running averages; or the given
    ones).

  Raises:
    ValueError: for shapes that do not fit, a stateful method, or a method
      that does not apply to this op (``"gradfilter"``).

  Example::

    y, mu, var = lv.batch_norm(x, gamma, beta, method="quant")   # 8-bit x̂
  """
  return batch_norm_with_stats(
      x, scale, bias, mean=mean, var=var, axis=axis, epsilon=epsilon,
      method=method, axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      use_fast_variance=use_fast_variance, dtype=dtype)[:3]


def feature_axis(module, field: str, ndim: int) -> int:
  """A Flax normalisation module's one feature axis (``field``), >= 0.

  Raises:
    ValueError: when the field names several axes.
  """
  axis = getattr(module, field)
  if isinstance(axis, (tuple, list)):
    if len(axis) != 1:
      raise ValueError(
          f"{type(module).__name__} at {'/'.join(map(str, module.path))!r}: "
          f"the compressed normalisation has one feature axis; got {field}="
          f"{axis}.")
    axis = axis[0]
  return axis % ndim


def linen_call(module: nn.BatchNorm, x, use_running_average: bool,
               method: methods_base.Method | None,
               collection: str = flax_stats.COLLECTION) -> jax.Array:
  """Runs ``module`` (an ``nn.BatchNorm``, inside its own call) through
  :func:`batch_norm`.

  Reads and writes exactly ``nn.BatchNorm``'s variables (``params``:
  ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``), so pretrained
  variables load unchanged; sows the residual's statistics into
  ``collection`` like the compressed contractions.
  """
  if not getattr(module, "force_float32_reductions", True):
    raise ValueError(
        f"{'/'.join(map(str, module.path))}: force_float32_reductions=False "
        "is not supported by the compressed BatchNorm.")
  x = jnp.asarray(x)
  axis = feature_axis(module, "axis", x.ndim)
  c = (x.shape[axis],)
  ra_mean = module.variable("batch_stats", "mean",
                            lambda s: jnp.zeros(s, jnp.float32), c)
  ra_var = module.variable("batch_stats", "var",
                           lambda s: jnp.ones(s, jnp.float32), c)
  scale = (module.param("scale", module.scale_init, c, module.param_dtype)
           if module.use_scale else None)
  bias = (module.param("bias", module.bias_init, c, module.param_dtype)
          if module.use_bias else None)
  path = "/".join(map(str, module.path))
  if method is not None:
    method = scope.configured(method, path)
  initializing = module.is_initializing()
  kw = dict(axis=axis, epsilon=module.epsilon, method=method,
            axis_index_groups=module.axis_index_groups,
            use_fast_variance=module.use_fast_variance, dtype=module.dtype)
  if use_running_average:
    y, _, _, stats = batch_norm_with_stats(
        x, scale, bias, mean=ra_mean.value, var=ra_var.value, **kw)
  else:
    y, mean, var, stats = batch_norm_with_stats(
        x, scale, bias, axis_name=None if initializing else module.axis_name,
        **kw)
    if not initializing:
      m = module.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean
      ra_var.value = m * ra_var.value + (1 - m) * var
  if not initializing:
    module.sow(collection, flax_stats.STATS, stats)
  return y


class BatchNorm(nn.BatchNorm):
  """``nn.BatchNorm`` whose backward pass keeps a small residual.

  Every field of ``nn.BatchNorm`` means the same here, and the variables
  are the same (a pretrained BatchNorm's load unchanged); ``mask`` is not
  supported. In training mode it keeps, instead of autodiff's float32
  ``x - mean``, what :attr:`method` keeps of ``x̂`` (see
  :func:`lowrank_vjp.batch_norm`), and sows that residual's
  :class:`lowrank_vjp.CompressionStats` into :attr:`collection`.

  Attributes:
    method: None (exact, keeps ``x``), or a stateless method or shorthand:
      ``"quant"`` (8-bit codes of ``x̂``), ``lv.methods.Quant(bits=4)``,
      ``"hosvd"``, ….
    collection: Where the statistics are sown.

  Example::

    bn = lv.flax.BatchNorm(momentum=0.9, method="quant")
    y, state = bn.apply(variables, x, use_running_average=False,
                        mutable=["batch_stats"])
  """

  method: Any = None
  collection: str = flax_stats.COLLECTION

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    """Normalises ``x`` (batch statistics unless running averages are used)."""
    if mask is not None:
      raise ValueError("lowrank_vjp.flax.BatchNorm does not take a mask; use "
                       "nn.BatchNorm for masked statistics.")
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    method = methods_base.resolve_stateless(self.method,
                                            "lowrank_vjp.flax.BatchNorm")
    return linen_call(self, x, use_running_average, method, self.collection)
