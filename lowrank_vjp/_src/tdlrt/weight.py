"""Tucker-factorized kernels: the ``TuckerWeight`` pytree and its initialisers.

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
import numpy as np
from jax import lax

_HIGHEST = lax.Precision.HIGHEST

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
    ValueError: for a tuple of the wrong length or a value out of range.
  """
  modes = tuple(int(n) for n in modes)
  if isinstance(ranks, Sequence) and not isinstance(ranks, str):
    ranks = tuple(ranks)
    if len(ranks) != len(modes):
      raise ValueError(f"ranks has {len(ranks)} entries but the kernel has "
                       f"{len(modes)} modes {modes}; give one per mode.")
    items = ranks
  else:
    items = (ranks,) * len(modes)
  out = []
  for n, r in zip(modes, items, strict=False):
    if r is None:
      out.append(n)
    elif isinstance(r, bool):
      raise ValueError(f"ranks must be ints, floats or None, got {ranks!r}.")
    elif isinstance(r, numbers.Integral):
      if r < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks!r}.")
      out.append(min(int(r), n))
    elif isinstance(r, numbers.Real):
      if not 0.0 < float(r) <= 1.0:
        raise ValueError(f"a fractional rank must lie in (0, 1], got {r!r}.")
      out.append(max(1, min(n, math.ceil(float(r) * n))))
    else:
      raise ValueError(f"ranks must be ints, floats or None, got {ranks!r}.")
  return tuple(out)


def unfold(x: jax.Array, mode: int) -> jax.Array:
  """Mode-``mode`` unfolding ``[n_mode, Π other sizes]`` (TensorLy order)."""
  return jnp.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def fold(m: jax.Array, mode: int, shape: Sequence[int]) -> jax.Array:
  """Inverse of :func:`unfold` for a tensor of ``shape``."""
  shape = tuple(shape)
  moved = (shape[mode],) + shape[:mode] + shape[mode + 1:]
  return jnp.moveaxis(m.reshape(moved), 0, mode)


def mode_dot(x: jax.Array, matrix: jax.Array, mode: int) -> jax.Array:
  """``x ×_mode matrix``: axis ``mode`` (size K) becomes ``matrix.shape[0]``.

  Args:
    x: Tensor ``[…, K, …]``.
    matrix: ``[n, K]``.
    mode: The axis of ``x`` to contract.

  Returns:
    ``[…, n, …]``.
  """
  y = jnp.tensordot(matrix, x, axes=([1], [mode]), precision=_HIGHEST)
  return jnp.moveaxis(y, 0, mode)


def tucker_product(core: jax.Array, factors: Sequence[jax.Array]) -> jax.Array:
  """``core ×₀ U₀ ×₁ U₁ …``: ``[R₀, …]`` with ``[n_i, R_i]`` → ``[n₀, …]``."""
  x = core
  # Expand the mode with the smallest growth first: cheaper intermediates.
  order = sorted(range(len(factors)),
                 key=lambda i: factors[i].shape[0]
                 / max(factors[i].shape[1], 1))
  for i in order:
    x = mode_dot(x, factors[i], i)
  return x


def active_ranks(factors: Sequence[jax.Array]) -> jax.Array:
  """``int32[d]``: per factor, the number of (orthonormal) non-zero columns.

  Active columns have unit norm and masked ones are exactly zero, so the
  count of columns with norm² > 1/4 is the active rank.
  """
  return jnp.stack([
      jnp.sum(jnp.sum(jnp.square(lax.stop_gradient(u)), axis=0) > 0.25)
      .astype(jnp.int32) for u in factors])


def param_count(modes: Sequence[int], ranks) -> Any:
  """Parameters of a rank-``ranks`` Tucker tensor: ``Π r_i + Σ n_i r_i``.

  Args:
    modes: Mode sizes ``n_i``.
    ranks: Ranks ``r_i`` (ints, or an int array for traced counts).

  Returns:
    The count, as an int (or an array if ``ranks`` is one).
  """
  if isinstance(ranks, (jax.Array, np.ndarray)):
    ranks = jnp.asarray(ranks)
    return (jnp.prod(ranks)
            + jnp.sum(jnp.asarray(modes, ranks.dtype) * ranks))
  return math.prod(ranks) + sum(
      n * r for n, r in zip(modes, ranks, strict=True))


def orthonormalize(v: jax.Array, keep: jax.Array) -> tuple[jax.Array,
                                                          jax.Array]:
  """Polar orthonormalization ``v = q h`` of the kept columns of ``v``.

  ``q = v (vᵀv)^{-1/2}`` is the orthonormal matrix closest to ``v`` (no
  reordering, no sign flips), from a small ``eigh``, which on the CPU is much
  faster than a QR or an SVD of a tall matrix.

  Args:
    v: ``[n, R]`` with linearly independent kept columns.
    keep: ``bool[R]``: columns to orthonormalize; the others become zero.

  Returns:
    ``(q, h)``: ``q`` ``[n, R]`` (zero outside ``keep``) and the symmetric
    ``h = (vᵀv)^{1/2}`` ``[R, R]`` (zero outside the kept block), so that
    ``v ≈ q h`` on the kept columns.
  """
  v = jnp.where(keep, v, 0.0)
  gram = jnp.dot(v.T, v, precision=_HIGHEST)
  gram = 0.5 * (gram + gram.T) + jnp.diag((~keep).astype(v.dtype))
  lam, vecs = jnp.linalg.eigh(gram)
  lam = jnp.maximum(lam, jnp.finfo(v.dtype).tiny)
  inv_sqrt = jnp.dot(vecs / jnp.sqrt(lam), vecs.T, precision=_HIGHEST)
  sqrt = jnp.dot(vecs * jnp.sqrt(lam), vecs.T, precision=_HIGHEST)
  both = keep[:, None] & keep[None, :]
  q = jnp.where(keep, jnp.dot(v, inv_sqrt, precision=_HIGHEST), 0.0)
  return q, jnp.where(both, sqrt, 0.0)


def leading_basis(m: jax.Array, keep_max, rtol: float):
  """Orthonormal basis of the column space of ``m`` by its Gram's ``eigh``.

  Args:
    m: ``[n, R]``.
    keep_max: At most this many columns are returned (int or int32 scalar).
    rtol: Singular values ``≤ rtol`` (absolute) are treated as zero.

  Returns:
    ``(basis, singular_values, keep)``: ``[n, R]`` with the leading left
    singular vectors of ``m`` in the kept columns (zero elsewhere), the
    singular values in descending order ``[R]`` and the ``bool[R]`` mask.
  """
  gram = jnp.dot(m.T, m, precision=_HIGHEST)
  lam, vecs = jnp.linalg.eigh(0.5 * (gram + gram.T))
  lam, vecs = jnp.maximum(lam[::-1], 0.0), vecs[:, ::-1]
  sv = jnp.sqrt(lam)
  keep = (sv > rtol) & (jnp.arange(m.shape[1]) < keep_max)
  basis = jnp.dot(m, vecs, precision=_HIGHEST) / jnp.where(keep, sv, 1.0)
  basis, _ = orthonormalize(basis, keep)
  return basis, sv, keep


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
  m = unfold(core, mode)                                 # [R_i, M]
  r_cap = m.shape[0]
  keep_rows = jnp.arange(r_cap) < rank
  m = jnp.where(keep_rows[:, None], m, 0.0)
  scale = jnp.sqrt(jnp.sum(jnp.square(m)))
  rtol = scale * jnp.sqrt(jnp.finfo(m.dtype).eps)
  q, _, _ = leading_basis(m.T, rank, rtol)               # [M, R_i]
  return q


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TuckerWeight(StructuredKernel):
  """A kernel in Tucker form: ``W = reshape(core ×₀ U₀ … ×_{d-1} U_{d-1})``.

  Saved bytes (capacity): ``itemsize · (Π R_i + Σ n_i R_i)``; the parameters
  of the rank-``r`` tensor it stands for are ``Π r_i + Σ n_i r_i``
  (:func:`param_count`).

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
    return param_count(self.modes, self.ranks())

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
      w = tucker_product(self.core, self.factors)
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
  out = tucker_product(core_c, fixed)
  modes = range(len(factors)) if modes is None else modes
  for i in modes:
    u = factors[i]
    q = _row_basis(core_c, i, ranks[i])
    qcore = fold(q.T, i, core_c.shape)
    delta = u - fixed[i]
    out = out + tucker_product(qcore, fixed[:i] + [delta] + fixed[i + 1:])
  return out


def _orthonormal(key, n, r, dtype):
  # Polar factor of a Gaussian matrix: Haar-distributed, and a small eigh
  # compiles and runs much faster on the CPU than a QR.
  q, _ = orthonormalize(jax.random.normal(key, (n, r), dtype),
                        jnp.ones((r,), bool))
  return q


def _mask_cols(u, rank):
  return jnp.where(jnp.arange(u.shape[1]) < rank, u, 0.0)


def _mask_core(core, ranks):
  mask = jnp.ones(core.shape, bool)
  for i, r in enumerate(ranks):
    shape = [1] * core.ndim
    shape[i] = core.shape[i]
    mask = mask & (jnp.arange(core.shape[i]) < r).reshape(shape)
  return jnp.where(mask, core, 0.0)


def _init_ranks(cap, init_ranks, modes):
  if init_ranks is None:
    return cap
  init = capacities(modes, init_ranks)
  return tuple(min(a, b) for a, b in zip(init, cap, strict=False))


def truncated_hosvd(x: jax.Array, capacity: Sequence[int],
                    ranks: Sequence[int] | None = None):
  """Truncated HOSVD of ``x`` with static capacities and masked ranks.

  Args:
    x: Tensor ``[n₀, …]``.
    capacity: ``R_i`` per mode (static).
    ranks: Active ranks ``r_i ≤ R_i`` (ints or int array); ``capacity`` when
      None.

  Returns:
    ``(core, factors)``: ``[R₀, …]`` and ``[n_i, R_i]`` with the leading
    left singular vectors of each unfolding in the first ``r_i`` columns.
  """
  ranks = tuple(capacity) if ranks is None else ranks
  factors = []
  for i, cap in enumerate(capacity):
    u, _, _ = jnp.linalg.svd(unfold(x, i), full_matrices=False)
    if u.shape[1] < cap:
      u = jnp.pad(u, ((0, 0), (0, cap - u.shape[1])))
    factors.append(_mask_cols(u[:, :cap], ranks[i]))
  core = x
  for i, u in enumerate(factors):
    core = mode_dot(core, u.T, i)
  return core, tuple(factors)


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
  core, factors = truncated_hosvd(kernel.reshape(modes), cap,
                                  _init_ranks(cap, init_ranks, modes))
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
  factors = tuple(_mask_cols(_orthonormal(k, n, r, dtype), r0)
                  for k, n, r, r0 in zip(keys[1:], modes, cap, init,
                                         strict=True))
  if stddev is None:
    stddev = 1.0 / math.sqrt(max(1, math.prod(shape[:-1])))
  scale = stddev * math.sqrt(math.prod(shape) / math.prod(init))
  core = _mask_core(scale * jax.random.normal(keys[0], cap, dtype), init)
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
