"""Tucker-factorized kernels: the ``TuckerWeight`` pytree and its initialisers.

This module is about *kernels* held in Tucker form (a weight's value, its
parameter count, how gradients reach its factors, how a model runs on it via
:func:`materialize`); the generic tensor algebra it is built from (unfoldings,
mode products, HOSVD, polar bases) lives in ``lowrank_vjp._src.tensor.algebra``
and the rank settings are read by ``lowrank_vjp._src.tensor.capacity``.

A kernel ``W`` of shape ``shape`` is kept as ``W = core ×₀ U₀ ×₁ U₁ … ×_{d-1}
U_{d-1}`` (TensorLy's vocabulary: ``core``, ``factors``, ``ranks``, ``mode``,
``unfold``). With ``factorization="tucker"`` the modes are the kernel's own
axes (``[KH, KW, I, O]`` for a Linen conv kernel); with ``"matrix"`` the
kernel is first reshaped to ``[KH·KW·I, O]`` and the order-2 Tucker form is a
matrix factorization ``U₀ · core · U₁ᵀ``.

Static shapes: every array has its *capacity* shape (``core`` is
``[R₀, …]``, ``factors[i]`` is ``[n_i, R_i]``); the *active* rank ``r_i ≤
R_i`` of a mode is the number of leading non-zero factor columns. Columns past
``r_i`` and the matching core slices are exactly zero (*masking*), so the
kernel is that of the rank-``r`` Tucker tensor while shapes never change under
``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lowrank_vjp._src.tensor import algebra
from lowrank_vjp._src.tensor import capacity as capacity_lib

FACTORIZATIONS = ("tucker", "matrix")
"""How a kernel is factorized: all of its axes, or as a matrix ``[rest, O]``."""

FORMS = ("factors", "basis")
"""How gradients reach the factors (see :class:`TuckerWeight`)."""


class StructuredKernel:
  """Base of the pytrees that stand for a kernel (``kernel()`` rebuilds it)."""

  def kernel(self, dtype=None) -> jax.Array:  # pragma: no cover - abstract
    raise NotImplementedError


def mode_sizes(shape: Sequence[int], factorization: str) -> tuple[int, ...]:
  """Sizes ``n_i`` of the Tucker modes of a kernel of ``shape``.

  Args:
    shape: The kernel's shape, e.g. ``[KH, KW, I, O]``.
    factorization: ``"tucker"`` (every axis is a mode) or ``"matrix"``
      (modes ``[Π shape[:-1], shape[-1]]``).

  Returns:
    The mode sizes.

  Raises:
    ValueError: for an unknown ``factorization`` or an empty shape.
  """
  shape = tuple(int(s) for s in shape)
  if factorization not in FACTORIZATIONS:
    raise ValueError(f"factorization must be one of {FACTORIZATIONS}, got "
                     f"{factorization!r}.")
  if not shape:
    raise ValueError("a kernel needs at least one axis, got shape ().")
  if factorization == "tucker" or len(shape) == 1:
    return shape
  return (math.prod(shape[:-1]), shape[-1])


def capacities(modes: Sequence[int], ranks) -> tuple[int, ...]:
  """Static rank capacity per mode.

  Args:
    modes: Mode sizes ``n_i``.
    ranks: An int (every mode, capped at ``n_i``), a float in ``(0, 1]``
      (``ceil(ranks · n_i)`` per mode), or a tuple with one int / float / None
      (the full ``n_i``) per mode.

  Returns:
    ``R_i`` per mode, each in ``[1, n_i]``.

  Raises:
    ValueError: for a tuple of the wrong length, a value out of range or of
      the wrong type (the checks and the int / fraction rule are those of
      ``lowrank_vjp._src.tensor.capacity``, shared with the compression
      methods).
  """
  modes = tuple(int(n) for n in modes)
  items = capacity_lib.per_axis(ranks, len(modes), "modes", shape=modes)
  out = []
  for n, r in zip(modes, items, strict=True):
    if r is None:
      out.append(n)
      continue
    if not capacity_lib.is_rank_value(r):
      raise ValueError(_rank_error(r, ranks))
    out.append(capacity_lib.resolve(r, n))
  return tuple(out)


def _rank_error(r, ranks) -> str:
  """Why ``r`` (an entry of ``ranks``) is not a valid rank."""
  if isinstance(r, numbers.Integral) and not isinstance(r, bool):
    return f"ranks must be >= 1, got {ranks!r}."
  if isinstance(r, numbers.Real) and not isinstance(r, bool):
    return f"a fractional rank must lie in (0, 1], got {r!r}."
  return f"ranks must be ints, floats or None, got {ranks!r}."


def active_ranks(factors: Sequence[jax.Array]) -> jax.Array:
  """``int32[d]``: per factor, the number of (orthonormal) non-zero columns.

  Active columns have unit norm and masked ones are exactly zero, so the
  count of columns with norm² > 1/4 is the active rank.
  """
  return jnp.stack([
      jnp.sum(jnp.sum(jnp.square(lax.stop_gradient(u)), axis=0) > 0.25)
      .astype(jnp.int32) for u in factors])


def _row_basis(core: jax.Array, mode: int, rank) -> jax.Array:
  """``Q_i``: orthonormal basis of the rows of ``unfold(core, mode)``.

  With ``unfold(core, mode) = S_i Q_iᵀ`` the mode's factor times the core
  reads ``U_i unfold(core) = (U_i S_i) Q_iᵀ = K_i Q_iᵀ``. The paper takes
  ``Q_i`` from a QR decomposition; any orthonormal basis of the same row
  space gives the same span of basis gradients, which is all the augmented
  basis depends on. Here it comes from the eigenvectors of the small Gram
  ``unfold · unfoldᵀ``; rows with a singular value below ``sqrt(eps)`` of the
  largest are left out.

  Returns:
    ``[Π_{j≠i} R_j, R_i]`` with the columns past ``rank`` set to zero.
  """
  m = algebra.unfold(core, mode)                         # [R_i, M]
  r_cap = m.shape[0]
  keep_rows = jnp.arange(r_cap) < rank
  m = jnp.where(keep_rows[:, None], m, 0.0)
  scale = jnp.sqrt(jnp.sum(jnp.square(m)))
  rtol = scale * jnp.sqrt(jnp.finfo(m.dtype).eps)
  q, _, _ = algebra.leading_basis(m.T, rank, rtol)       # [M, R_i]
  return q


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TuckerWeight(StructuredKernel):
  """A kernel in Tucker form: ``W = reshape(core ×₀ U₀ … ×_{d-1} U_{d-1})``.

  Saved bytes (capacity): ``itemsize · (Π R_i + Σ n_i R_i)``; the parameters
  of the rank-``r`` tensor it stands for are ``Π r_i + Σ n_i r_i``
  (:func:`lowrank_vjp.tdlrt.param_count`).

  ``form`` only changes which gradient reaches the factors; the kernel's value
  is the same in both forms:

  - ``"factors"``: the plain derivative of the loss with respect to ``U_i``
    (used for inference and for direct training of the factors).
  - ``"basis"``: the derivative with respect to ``K_i = U_i S_iᵀ`` in the
    re-parametrisation ``W = fold_i(K_i Q_iᵀ) ×_{j≠i} U_j``, where
    ``unfold(core, i) = S_i Q_iᵀ`` with orthonormal ``Q_i``. This is what
    TDLRT's basis step needs; one backward pass gives it for every mode at
    once, and it never divides by ``S_i`` (no trouble with small singular
    values).

  Attributes:
    core: ``[R₀, …, R_{d-1}]``, zero past the active ranks.
    factors: ``d`` arrays ``[n_i, R_i]``; the first ``r_i`` columns are
      orthonormal for TDLRT (any for direct training), the rest zero.
    shape: Static shape of the kernel it stands for (``Π n_i = Π shape``).
    form: Static, ``"factors"`` or ``"basis"``.
    basis_modes: Static; in ``"basis"`` form, the modes whose factors get
      basis gradients (None: all). The other factors get no gradient.
  """

  core: jax.Array
  factors: tuple[jax.Array, ...]
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  form: str = dataclasses.field(metadata=dict(static=True), default="factors")
  basis_modes: tuple[int, ...] | None = dataclasses.field(
      metadata=dict(static=True), default=None)

  def __post_init__(self):
    if self.form not in FORMS:
      raise ValueError(f"form must be one of {FORMS}, got {self.form!r}.")

  @property
  def modes(self) -> tuple[int, ...]:
    """Mode sizes ``n_i``."""
    return tuple(int(u.shape[0]) for u in self.factors)

  @property
  def capacity(self) -> tuple[int, ...]:
    """Static rank capacity ``R_i`` per mode."""
    return tuple(int(u.shape[1]) for u in self.factors)

  @property
  def nbytes(self) -> int:
    """Bytes held by the core and the factors at capacity (static)."""
    size = math.prod(self.core.shape) + sum(
        math.prod(u.shape) for u in self.factors)
    return size * jnp.dtype(self.core.dtype).itemsize

  def ranks(self) -> jax.Array:
    """``int32[d]``: active rank per mode (see :func:`active_ranks`)."""
    return active_ranks(self.factors)

  def num_params(self) -> jax.Array:
    """Parameters of the active rank-``r`` Tucker tensor (int32 scalar)."""
    return algebra.param_count(self.modes, self.ranks())

  def with_form(self, form: str,
                basis_modes: tuple[int, ...] | None = None) -> TuckerWeight:
    """The same weight with another gradient ``form`` (and ``basis_modes``)."""
    return dataclasses.replace(self, form=form, basis_modes=basis_modes)

  def kernel(self, dtype=None) -> jax.Array:
    """Rebuilds the full kernel ``[*shape]``.

    Args:
      dtype: Output dtype; the core's when None.

    Returns:
      The kernel; in ``"basis"`` form its derivative with respect to
      ``factors[i]`` is the TDLRT basis gradient of mode ``i``.
    """
    if self.form == "factors":
      w = algebra.tucker_product(self.core, self.factors)
    else:
      w = _basis_form_kernel(self.core, self.factors, self.basis_modes)
    return w.reshape(self.shape).astype(dtype or self.core.dtype)


def _basis_form_kernel(core, factors, modes=None):
  """Kernel whose factor-gradients are the basis gradients ``∂L/∂K_i``.

  Value: ``core ×ᵢ Uᵢ`` (the ``δᵢ`` below are zero). Derivative with respect
  to ``factors[i]``: that of ``fold_i(δᵢ Q_iᵀ) ×_{j≠i} U_j``, i.e. of the
  kernel as a function of ``K_i``.
  """
  sg = lax.stop_gradient
  core_c = sg(core)
  fixed = [sg(u) for u in factors]
  ranks = active_ranks(fixed)
  out = algebra.tucker_product(core_c, fixed)
  modes = range(len(factors)) if modes is None else modes
  for i in modes:
    u = factors[i]
    q = _row_basis(core_c, i, ranks[i])
    qcore = algebra.fold(q.T, i, core_c.shape)
    delta = u - fixed[i]
    out = out + algebra.tucker_product(qcore,
                                       fixed[:i] + [delta] + fixed[i + 1:])
  return out


def _orthonormal(key, n, r, dtype):
  # Polar factor of a Gaussian matrix: Haar-distributed, and a small eigh
  # compiles and runs much faster on the CPU than a QR.
  q, _ = algebra.orthonormalize(jax.random.normal(key, (n, r), dtype),
                                jnp.ones((r,), bool))
  return q


def _init_ranks(cap, init_ranks, modes):
  if init_ranks is None:
    return cap
  init = capacities(modes, init_ranks)
  return tuple(min(a, b) for a, b in zip(init, cap, strict=False))


def tucker_from_kernel(kernel: jax.typing.ArrayLike, ranks=0.5, *,
                       init_ranks=None,
                       factorization: str = "tucker") -> TuckerWeight:
  """Tucker form of a (pretrained) kernel by truncated HOSVD.

  Args:
    kernel: Kernel of any shape, e.g. ``[KH, KW, I, O]`` or ``[I, O]``.
    ranks: Static capacity per mode (see :func:`capacities`).
    init_ranks: Active ranks to start from (same forms as ``ranks``, capped
      at the capacity); the capacity when None.
    factorization: ``"tucker"`` or ``"matrix"`` (see :func:`mode_sizes`).

  Returns:
    A :class:`TuckerWeight` whose kernel is the truncated HOSVD of
    ``kernel`` (exactly ``kernel`` at full ranks).

  Example::

    w = tucker_from_kernel(jnp.ones((3, 3, 16, 32)), ranks=(3, 3, 8, 8))
    w.kernel().shape   # (3, 3, 16, 32)
  """
  kernel = jnp.asarray(kernel)
  modes = mode_sizes(kernel.shape, factorization)
  cap = capacities(modes, ranks)
  core, factors = algebra.truncated_hosvd(
      kernel.reshape(modes), cap, _init_ranks(cap, init_ranks, modes))
  return TuckerWeight(core.astype(kernel.dtype),
                      tuple(u.astype(kernel.dtype) for u in factors),
                      shape=tuple(kernel.shape))


def random_tucker(key: jax.Array, shape: Sequence[int], ranks=0.5, *,
                  init_ranks=None, factorization: str = "tucker",
                  stddev: float | None = None,
                  dtype=jnp.float32) -> TuckerWeight:
  """A random Tucker kernel: orthonormal factors and a Gaussian core.

  The core's scale makes ``E‖W‖²_F`` equal that of a kernel with i.i.d.
  entries of standard deviation ``stddev`` (LeCun normal,
  ``1/sqrt(Π shape[:-1])``, when None).

  Args:
    key: PRNG key.
    shape: Kernel shape, e.g. ``[KH, KW, I, O]``.
    ranks: Static capacity per mode (see :func:`capacities`).
    init_ranks: Active ranks to start from; the capacity when None.
    factorization: ``"tucker"`` or ``"matrix"``.
    stddev: Entry scale of the full kernel it imitates.
    dtype: Parameter dtype.

  Returns:
    A :class:`TuckerWeight`.

  Example::

    w = random_tucker(jax.random.key(0), (3, 3, 16, 32), ranks=8)
  """
  shape = tuple(int(s) for s in shape)
  modes = mode_sizes(shape, factorization)
  cap = capacities(modes, ranks)
  init = _init_ranks(cap, init_ranks, modes)
  keys = jax.random.split(key, len(modes) + 1)
  factors = tuple(algebra.mask_columns(_orthonormal(k, n, r, dtype), r0)
                  for k, n, r, r0 in zip(keys[1:], modes, cap, init,
                                         strict=True))
  if stddev is None:
    stddev = 1.0 / math.sqrt(max(1, math.prod(shape[:-1])))
  scale = stddev * math.sqrt(math.prod(shape) / math.prod(init))
  core = algebra.mask_core(scale * jax.random.normal(keys[0], cap, dtype),
                           init)
  return TuckerWeight(core, factors, shape=shape)


def is_structured(x: Any) -> bool:
  """Whether ``x`` is a factorized-kernel pytree (:class:`StructuredKernel`)."""
  return isinstance(x, StructuredKernel)


def materialize(params: Any, dtype=None) -> Any:
  """Replaces every factorized kernel in ``params`` by its full kernel.

  Lets an unchanged model (plain ``nn.Conv`` / ``nn.Dense``) run on
  factorized parameters: gradients flow through the rebuild into the core
  and factors (or, in ``"basis"`` form, to the basis gradients).

  Args:
    params: Any pytree; :class:`TuckerWeight` and the adapter pytrees in it
      are rebuilt, other leaves pass through.
    dtype: Dtype of the rebuilt kernels; their own when None.

  Returns:
    The same tree with plain arrays for the kernels.

  Example::

    params["conv"]["kernel"] = tucker_from_kernel(params["conv"]["kernel"])
    logits = model.apply({"params": materialize(params)}, x)
  """
  return jax.tree_util.tree_map(
      lambda x: x.kernel(dtype) if is_structured(x) else x, params,
      is_leaf=is_structured)
