"""Flax Linen layers whose kernel is a :class:`TuckerWeight`.

``TuckerConv`` and ``TuckerDense`` hold one parameter ``"kernel"`` (a
:class:`TuckerWeight`: core plus one orthonormal factor per mode) and an
optional ``"bias"``. The forward pass either rebuilds the kernel and runs one
convolution / product, or (``forward="factored"``) runs a chain of small ones
in the factors' rank space; ``"auto"`` picks whichever needs fewer
multiply-adds for the static shapes. TDLRT's basis step needs the rebuilt
kernel, so a weight in ``"basis"`` form always takes the kernel path.

An unchanged model (plain ``nn.Conv`` / ``nn.Dense``) can also run on Tucker
parameters through :func:`materialize`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lowrank_vjp._src.tdlrt import weight as tw
from lowrank_vjp._src.tensor import algebra

FORWARDS = ("auto", "kernel", "factored")
"""How a Tucker layer computes its output."""

_HIGHEST = lax.Precision.HIGHEST


def _tuple(x, n, name):
  if isinstance(x, int):
    return (x,) * n
  x = tuple(x)
  if len(x) != n:
    raise ValueError(f"{name} needs {n} entries, got {x!r}.")
  return x


def _dimension_numbers(n_spatial: int):
  letters = "HWD"[:n_spatial]
  if n_spatial > 3:
    raise ValueError(f"TuckerConv supports 1 to 3 spatial axes, got "
                     f"{n_spatial}.")
  return (f"N{letters}C", f"{letters}IO", f"N{letters}C")


def conv_macs(weight: tw.TuckerWeight, kernel_size: Sequence[int],
              in_pixels: int, out_pixels: int, factorization: str
              ) -> tuple[int, int]:
  """Multiply-adds per example of the kernel and of the factored forward.

  Args:
    weight: The layer's weight (its capacity sets the factored cost).
    kernel_size: Spatial kernel size.
    in_pixels: Input pixels per example (product of spatial sizes).
    out_pixels: Output pixels per example.
    factorization: ``"tucker"`` or ``"matrix"``.

  Returns:
    ``(kernel_path, factored_path)`` multiply-adds.
  """
  k = math.prod(kernel_size)
  c_in, c_out = weight.shape[-2], weight.shape[-1]
  full = out_pixels * k * c_in * c_out
  cap = weight.capacity
  if factorization == "tucker":
    r_in, r_out = cap[-2], cap[-1]
    fact = (in_pixels * c_in * r_in + out_pixels * k * r_in * r_out
            + out_pixels * r_out * c_out)
  else:
    r = cap[-1]
    fact = out_pixels * k * c_in * r + out_pixels * r * c_out
  return full, fact


class TuckerConv(nn.Module):
  """A Linen convolution (``NHWC`` input, ``HWIO`` kernel) in Tucker form.

  Attributes:
    features: Output channels ``O``.
    kernel_size: Spatial size, e.g. ``(3, 3)``.
    ranks: Static rank capacity per mode (``[KH, KW, I, O]`` for
      ``"tucker"``, ``[KH·KW·I, O]`` for ``"matrix"``): an int, a fraction in
      ``(0, 1]``, or a tuple with None for a full mode.
    init_ranks: Active ranks at initialisation (capacity when None).
    factorization: ``"tucker"`` (every kernel axis a mode) or ``"matrix"``.
    strides: Window strides.
    padding: ``"SAME"``, ``"VALID"`` or explicit pairs, as ``nn.Conv``.
    kernel_dilation: Kernel (``rhs``) dilation.
    use_bias: Whether to add a bias ``[O]``.
    forward: ``"auto"``, ``"kernel"`` or ``"factored"`` (see module doc).
    conv_general_dilated: The convolution to call, with
      ``lax.conv_general_dilated``'s signature; e.g.
      ``lowrank_vjp.compressed_conv(method="hosvd")`` to also compress the
      saved activation.
    kernel_init: ``init(key, shape, ranks, init_ranks, factorization, dtype)``
      returning the :class:`TuckerWeight`; :func:`random_tucker` by default.
    bias_init: Initializer of the bias.
    dtype: Computation dtype (the input's, promoted, when None).
    param_dtype: Parameter dtype.

  Example::

    conv = TuckerConv(32, (3, 3), ranks=(3, 3, 8, 8))
    x = jnp.ones((2, 16, 16, 16))                       # [N, H, W, I]
    params = conv.init(jax.random.key(0), x)["params"]
    y = conv.apply({"params": params}, x)               # [2, 16, 16, 32]
  """

  features: int
  kernel_size: Sequence[int]
  ranks: Any = 0.5
  init_ranks: Any = None
  factorization: str = "tucker"
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  kernel_dilation: int | Sequence[int] = 1
  use_bias: bool = True
  forward: str = "auto"
  conv_general_dilated: Callable = lax.conv_general_dilated
  kernel_init: Callable | None = None
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    """Applies the convolution.

    Args:
      x: ``[N, *spatial, I]``.

    Returns:
      ``[N, *spatial', O]``.

    Raises:
      ValueError: for an unknown ``forward`` or mismatched shapes.
    """
    if self.forward not in FORWARDS:
      raise ValueError(f"forward must be one of {FORWARDS}, got "
                       f"{self.forward!r}.")
    x = jnp.asarray(x)
    ks = tuple(self.kernel_size)
    n_sp = len(ks)
    if x.ndim != n_sp + 2:
      raise ValueError(f"TuckerConv with kernel_size {ks} needs input "
                       f"[N, *{n_sp} spatial, C], got shape {x.shape}.")
    shape = ks + (x.shape[-1], self.features)
    init = self.kernel_init or _default_init
    w = _kernel_param(self, lambda key: init(
        key, shape, self.ranks, self.init_ranks, self.factorization,
        self.param_dtype))
    if not isinstance(w, tw.TuckerWeight) or tuple(w.shape) != shape:
      raise ValueError(f"param 'kernel' must be a TuckerWeight of shape "
                       f"{shape}, got {type(w).__name__} "
                       f"{getattr(w, 'shape', None)}.")
    dtype = self.dtype or jnp.result_type(x, w.core)
    x = x.astype(dtype)
    strides = _tuple(self.strides, n_sp, "strides")
    dil = _tuple(self.kernel_dilation, n_sp, "kernel_dilation")
    padding = self.padding
    if not isinstance(padding, str):
      padding = tuple(tuple(p) for p in padding)
    dn = _dimension_numbers(n_sp)
    conv = lambda lhs, rhs: self.conv_general_dilated(
        lhs, rhs, strides, padding, None, dil, dn)
    forward = self.forward
    if w.form == "basis":
      forward = "kernel"
    elif forward == "auto":
      in_px = math.prod(x.shape[1:-1])
      out_px = math.prod(-(-n // s) for n, s in zip(x.shape[1:-1], strides,
                                                     strict=True))
      full, fact = conv_macs(w, ks, in_px, out_px, self.factorization)
      forward = "factored" if fact < full else "kernel"
    if forward == "kernel":
      y = conv(x, w.kernel(dtype))
    elif self.factorization == "tucker":
      u = [f.astype(dtype) for f in w.factors]
      x1 = jnp.dot(x, u[-2], precision=_HIGHEST)            # [N, ..., R_I]
      small = w.core.astype(dtype)
      for axis in range(n_sp):
        small = algebra.mode_dot(small, u[axis], axis)     # [KH, KW, R_I, R_O]
      y = conv(x1, small)
      y = jnp.dot(y, u[-1].T, precision=_HIGHEST)          # [N, ..., O]
    else:
      u0, u1 = (f.astype(dtype) for f in w.factors)
      first = jnp.dot(u0, w.core.astype(dtype), precision=_HIGHEST)
      y = conv(x, first.reshape(ks + (x.shape[-1], -1)))
      y = jnp.dot(y, u1.T, precision=_HIGHEST)
    if self.use_bias:
      b = self.param("bias", self.bias_init, (self.features,),
                     self.param_dtype)
      y = y + b.astype(dtype)
    return y


class TuckerDense(nn.Module):
  """A Linen dense layer whose ``[I, O]`` kernel is ``U_I · core · U_Oᵀ``.

  Attributes:
    features: Output features ``O``.
    ranks: Static capacity ``(R_I, R_O)`` (or one int / fraction for both).
    init_ranks: Active ranks at initialisation (capacity when None).
    use_bias: Whether to add a bias ``[O]``.
    forward: ``"auto"``, ``"kernel"`` or ``"factored"``.
    dot_general: The contraction to call, with ``lax.dot_general``'s
      signature (e.g. ``lowrank_vjp.compressed_dense(...)``).
    kernel_init: As :class:`TuckerConv`.
    bias_init: Initializer of the bias.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.

  Example::

    dense = TuckerDense(10, ranks=4)
    params = dense.init(jax.random.key(0), jnp.ones((2, 64)))["params"]
  """

  features: int
  ranks: Any = 0.5
  init_ranks: Any = None
  use_bias: bool = True
  forward: str = "auto"
  dot_general: Callable = lax.dot_general
  kernel_init: Callable | None = None
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    """Applies the layer.

    Args:
      x: ``[..., I]``.

    Returns:
      ``[..., O]``.
    """
    if self.forward not in FORWARDS:
      raise ValueError(f"forward must be one of {FORWARDS}, got "
                       f"{self.forward!r}.")
    x = jnp.asarray(x)
    shape = (x.shape[-1], self.features)
    init = self.kernel_init or _default_init
    w = _kernel_param(self, lambda key: init(
        key, shape, self.ranks, self.init_ranks, "tucker", self.param_dtype))
    if not isinstance(w, tw.TuckerWeight) or tuple(w.shape) != shape:
      raise ValueError(f"param 'kernel' must be a TuckerWeight of shape "
                       f"{shape}.")
    dtype = self.dtype or jnp.result_type(x, w.core)
    x = x.astype(dtype)
    dn = (((x.ndim - 1,), (0,)), ((), ()))
    forward = self.forward
    if w.form == "basis":
      forward = "kernel"
    elif forward == "auto":
      r_i, r_o = w.capacity
      forward = ("factored" if r_i * (shape[0] + r_o) + r_o * shape[1]
                 < shape[0] * shape[1] else "kernel")
    if forward == "kernel":
      y = self.dot_general(x, w.kernel(dtype), dn)
    else:
      u_i, u_o = (f.astype(dtype) for f in w.factors)
      y = self.dot_general(x, u_i, dn)
      y = jnp.dot(y, w.core.astype(dtype), precision=_HIGHEST)
      y = jnp.dot(y, u_o.T, precision=_HIGHEST)
    if self.use_bias:
      b = self.param("bias", self.bias_init, (self.features,),
                     self.param_dtype)
      y = y + b.astype(dtype)
    return y


def _kernel_param(module: nn.Module, init_fn) -> Any:
  """The ``"kernel"`` param, without Linen's check against the init shape.

  TDLRT's Galerkin step evaluates the layer with a core and factors of the
  augmented capacity (``min(2R, n)`` columns), which Linen's shape check on
  existing parameters would reject.
  """
  if module.has_variable("params", "kernel"):
    return module.get_variable("params", "kernel")
  return module.param("kernel", init_fn)


def _default_init(key, shape, ranks, init_ranks, factorization, dtype):
  return tw.random_tucker(key, shape, ranks, init_ranks=init_ranks,
                          factorization=factorization, dtype=dtype)
