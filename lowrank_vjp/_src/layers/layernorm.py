"""LayerNorm and RMSNorm whose backward pass keeps codes of ``x̂``.

The same written-out backward pass as the training-mode BatchNorm
(:mod:`lowrank_vjp._src.layers.batchnorm_train`), with the statistics taken
per token over the features instead of per channel over the batch: what is
kept is the per-token mean and ``1/σ`` plus a method's residual of ``x̂``
(``method=None``: the input ``x`` itself, exact). Flax's ``nn.LayerNorm``
and ``nn.RMSNorm`` leave the backward pass to autodiff, which keeps a
float32 copy of the centred input and the normalised one.

The Linen modules default to 8-bit per-feature codes (:data:`DEFAULT_METHOD`)
— a quarter of a float32 input — so that a transformer block's norms keep
no float tensor of their own; ``method=None`` is the exact mode.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from lowrank_vjp._src.control import scope
from lowrank_vjp._src.flax import stats as flax_stats
from lowrank_vjp._src.layers import batchnorm_train
from lowrank_vjp._src.methods import base as methods_base
from lowrank_vjp._src.methods import quant

DEFAULT_METHOD = quant.Quant(bits=8, per_channel=True)
"""What :class:`LayerNorm` and :class:`RMSNorm` keep of ``x̂`` by default."""


def layer_norm(x: jax.typing.ArrayLike, scale: jax.typing.ArrayLike | None,
               bias: jax.typing.ArrayLike | None, *, axis: int = -1,
               reduction_axes: int | tuple[int, ...] = -1,
               epsilon: float = 1e-6, method: Any = None,
               use_fast_variance: bool = True, dtype: Any = None
               ) -> jax.Array:
  """``nn.LayerNorm``'s output; the backward keeps a method's residual of x̂.

  Args:
    x: Activation, e.g. ``[batch, tokens, features]``.
    scale, bias: ``[C]`` on ``axis`` (or None).
    axis: The features' axis (of the affine parameters).
    reduction_axes: The axes each token's statistics average over.
    epsilon: Added to the variance, ``> 0``.
    method: None (exact: keeps ``x``), or a stateless method or shorthand
      (``lv.methods.Quant(per_channel=True)``: 8-bit codes).
    use_fast_variance: As ``nn.LayerNorm``.
    dtype: Output dtype (default: that of ``x`` and the parameters).

  Returns:
    The normalised activation; gradients to ``x``, ``scale`` and ``bias``
    (exact with ``method=None``, at the decoded ``x̂`` otherwise).

  Example::

    y = lv.layer_norm(x, gamma, beta, method="quant")
  """
  return batchnorm_train.normalization_with_stats(
      "layer_norm", x, scale, bias, axis=axis, reduce=reduction_axes,
      epsilon=epsilon, method=method, use_fast_variance=use_fast_variance,
      dtype=dtype)[0]


def rms_norm(x: jax.typing.ArrayLike, scale: jax.typing.ArrayLike | None, *,
             axis: int = -1, reduction_axes: int | tuple[int, ...] = -1,
             epsilon: float = 1e-6, method: Any = None, dtype: Any = None
             ) -> jax.Array:
  """``nn.RMSNorm``'s output, ``x / sqrt(mean(x²) + ε) · scale``; the
  backward keeps a method's residual of ``x̂`` (see :func:`layer_norm`).

  Example::

    y = lv.rms_norm(x, gamma)
  """
  return batchnorm_train.normalization_with_stats(
      "rms_norm", x, scale, None, axis=axis, reduce=reduction_axes,
      use_mean=False, epsilon=epsilon, method=method, dtype=dtype)[0]


def _linen_call(module, x, *, use_mean: bool, use_bias: bool,
                method, collection: str):
  x = jax.numpy.asarray(x)
  axis = batchnorm_train.feature_axis(module, "feature_axes", x.ndim)
  c = (x.shape[axis],)
  scale = (module.param("scale", module.scale_init, c, module.param_dtype)
           if module.use_scale else None)
  bias = (module.param("bias", module.bias_init, c, module.param_dtype)
          if use_bias else None)
  if method is not None:
    method = scope.configured(method, "/".join(map(str, module.path)))
  y, _, _, stats = batchnorm_train.normalization_with_stats(
      type(module).__name__, x, scale, bias, axis=axis,
      reduce=module.reduction_axes, use_mean=use_mean,
      epsilon=module.epsilon, method=method, axis_name=module.axis_name,
      axis_index_groups=module.axis_index_groups,
      use_fast_variance=module.use_fast_variance, dtype=module.dtype)
  if not module.is_initializing():
    module.sow(collection, flax_stats.STATS, stats)
  return y


def _call(module, x, mask, use_mean: bool):
  """The Linen modules' ``__call__``."""
  name = type(module).__name__
  if mask is not None:
    raise ValueError(f"lowrank_vjp.flax.{name} does not take a mask; use "
                     f"nn.{name} for masked statistics.")
  method = methods_base.resolve_stateless(module.method,
                                          f"lowrank_vjp.flax.{name}")
  return _linen_call(module, x, use_mean=use_mean,
                     use_bias=use_mean and module.use_bias, method=method,
                     collection=module.collection)


class LayerNorm(nn.LayerNorm):
  """``nn.LayerNorm`` whose backward keeps codes of ``x̂`` (by default).

  Same fields and variables as ``nn.LayerNorm`` (``scale``, ``bias``);
  ``mask`` is not supported. Sows the residual's
  :class:`lowrank_vjp.CompressionStats` into :attr:`collection`.

  Attributes:
    method: What is kept of ``x̂``: :data:`DEFAULT_METHOD` (8-bit codes per
      feature), None (exact: keeps ``x``), or another stateless method.
    collection: Where the statistics are sown.

  Example::

    x = lv.flax.LayerNorm(name="ln_1")(x)      # instead of nn.LayerNorm
  """

  method: Any = DEFAULT_METHOD
  collection: str = flax_stats.COLLECTION

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalises each token of ``x``."""
    return _call(self, x, mask, use_mean=True)


class RMSNorm(nn.RMSNorm):
  """``nn.RMSNorm`` whose backward keeps codes of ``x̂`` (by default).

  Same fields and variables as ``nn.RMSNorm`` (``scale``); see
  :class:`LayerNorm`.

  Attributes:
    method: As :class:`LayerNorm`.
    collection: Where the statistics are sown.

  Example::

    x = lv.flax.RMSNorm(name="norm")(x)         # instead of nn.RMSNorm
  """

  method: Any = DEFAULT_METHOD
  collection: str = flax_stats.COLLECTION

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalises each token of ``x`` by its root mean square."""
    return _call(self, x, mask, use_mean=False)
