"""BatchNorm frozen for fine-tuning: a per-channel affine that keeps nothing.

With the running statistics, the scale and the bias all fixed, BatchNorm is
``y = x · a + c`` with ``a = scale / sqrt(var + ε)`` and
``c = bias - mean · a`` per channel; its input gradient is ``g · a``. The
VJP saves ``a`` (``C`` numbers) and nothing of the activation. Flax's
``nn.BatchNorm`` keeps ``x - mean`` (full size) even with
``use_running_average=True`` as soon as its scale and bias are trained, and
in training mode more (docs/memory.md); next to a compressed layer that
undoes the saving.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _channel_shape(ndim: int, axis: int, size: int):
  shape = [1] * ndim
  shape[axis] = size
  return tuple(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _affine(axis: int, x, a, c):
  shape = _channel_shape(x.ndim, axis, x.shape[axis])
  return (x * a.reshape(shape).astype(x.dtype)
          + c.reshape(shape).astype(x.dtype))


def _affine_fwd(axis, x, a, c):
  return _affine(axis, x, a, c), a


def _affine_bwd(axis, a, g):
  shape = _channel_shape(g.ndim, axis, a.shape[0])
  zeros = jnp.zeros_like(a)  # the parameters are frozen
  return g * a.reshape(shape).astype(g.dtype), zeros, zeros


_affine.defvjp(_affine_fwd, _affine_bwd)


def frozen_batch_norm(x: jax.typing.ArrayLike, mean: jax.typing.ArrayLike,
                      var: jax.typing.ArrayLike, scale: jax.typing.ArrayLike,
                      bias: jax.typing.ArrayLike, *, axis: int = -1,
                      epsilon: float = 1e-5) -> jax.Array:
  """Inference-mode BatchNorm with every parameter frozen.

  Args:
    x: Activation, e.g. ``[N, H, W, C]``.
    mean, var: Running statistics, ``[C]``.
    scale, bias: Affine parameters, ``[C]``.
    axis: The channel axis of ``x``.
    epsilon: Added to ``var``.

  Returns:
    ``(x - mean) / sqrt(var + ε) · scale + bias``, same shape and dtype as
    ``x``. Gradients flow to ``x`` only (the parameters get zeros); the VJP
    keeps ``C`` numbers.

  Example::

    y = lv.frozen_batch_norm(x, stats["mean"], stats["var"],
                             params["scale"], params["bias"])
  """
  x = jnp.asarray(x)
  axis = axis % x.ndim
  mean, var, scale, bias = (lax.stop_gradient(jnp.asarray(v, jnp.float32))
                            for v in (mean, var, scale, bias))
  for name, v in (("mean", mean), ("var", var), ("scale", scale),
                  ("bias", bias)):
    if v.shape != (x.shape[axis],):
      raise ValueError(
          f"{name} must have shape ({x.shape[axis]},) (channel axis {axis} "
          f"of x with shape {x.shape}); got {v.shape}.")
  a = scale * lax.rsqrt(var + epsilon)
  return _affine(axis, x, a, bias - mean * a)


class FrozenBatchNorm(nn.Module):
  """``nn.BatchNorm`` for fine-tuning with frozen statistics and affine.

  Reads the same variables as ``nn.BatchNorm`` (``params``: ``scale``,
  ``bias``; ``batch_stats``: ``mean``, ``var``), so a pretrained BatchNorm's
  variables load unchanged; the parameters receive zero gradients and the
  statistics are never updated. Its VJP keeps nothing of the activation.

  Attributes:
    axis: Channel axis.
    epsilon: Added to the variance.
    use_scale, use_bias: As ``nn.BatchNorm``.

  Example::

    bn = lv.flax.FrozenBatchNorm()           # instead of nn.BatchNorm(...)
    y = bn.apply({"params": p, "batch_stats": s}, x)
  """

  axis: int = -1
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike,
               use_running_average: bool | None = None) -> jax.Array:
    """Normalises ``x`` with the running statistics.

    Args:
      x: Activation.
      use_running_average: Ignored (always True), accepted so the module
        drops in where ``nn.BatchNorm`` is called with it.

    Returns:
      The normalised activation.
    """
    del use_running_average
    x = jnp.asarray(x)
    c = x.shape[self.axis]
    mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    scale = (self.param("scale", nn.initializers.ones, (c,), jnp.float32)
             if self.use_scale else jnp.ones((c,), jnp.float32))
    bias = (self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
            if self.use_bias else jnp.zeros((c,), jnp.float32))
    return frozen_batch_norm(x, mean.value, var.value, scale, bias,
                             axis=self.axis, epsilon=self.epsilon)
