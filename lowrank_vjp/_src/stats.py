"""What a compressed layer reports about each step: :class:`CompressionStats`."""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressionStats:
  """What one compressed layer kept on one step.

  Arrays (traced, one entry per axis of the activation):
    needed_ranks: ``int32[n]``, the fewest components reaching ε per mode
      (the axis size for uncompressed axes).
    kept_ranks: ``int32[n]``, components actually kept:
      ``min(needed_ranks, capacity)``.
    kept_energy: ``float32[n]``, explained variance of the kept components
      (1.0 for uncompressed axes and for an all-zero activation).
    overflow: ``bool[]``, True when some mode needed more than its capacity,
      so less than ε was kept.

  Static fields (Python values):
    shape: The activation's shape.
    capacity: Static rank capacity per axis (None = uncompressed).
    method: The compression method.
    itemsize: Bytes per element of the activation.
    residual_nbytes: Bytes the saved residual occupies (capacity-sized).

  Stats of several calls of one layer (a layer called twice, or a layer
  inside ``nn.scan``, whose stats are stacked along leading axes) hold one
  row of ranks per call; the byte counts (:attr:`activation_nbytes`,
  ``residual_nbytes``) are per call, :attr:`calls` says how many.
  """

  needed_ranks: jax.Array
  kept_ranks: jax.Array
  kept_energy: jax.Array
  overflow: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  capacity: tuple[int | None, ...] = dataclasses.field(
      metadata=dict(static=True))
  method: str = dataclasses.field(metadata=dict(static=True))
  itemsize: int = dataclasses.field(metadata=dict(static=True))
  residual_nbytes: int = dataclasses.field(metadata=dict(static=True))

  @property
  def calls(self) -> int:
    """Calls these stats cover: rows of ``needed_ranks`` (1 unless stacked).
    """
    return max(1, math.prod(np.shape(self.needed_ranks)) // max(
        1, len(self.shape)))

  @property
  def activation_nbytes(self) -> int:
    """Bytes of the uncompressed activation (what vanilla backprop saves)."""
    return math.prod(self.shape) * self.itemsize

  def analytic_nbytes(self) -> int:
    """The paper's count at the ranks ε needed: ``(Π K + Σ I·K) · itemsize``.

    Uses ``needed_ranks`` (not the capacity), so it is the memory an ideal
    dynamic-shape implementation would hold. Needs concrete (not traced)
    statistics. A layer without ranks (vanilla, gradient filter, K-bit
    codes, checkpointing) saves a residual whose size the shape fixes: its
    count is ``residual_nbytes``. Stacked stats (:attr:`calls` > 1) count
    every call: each keeps its own residual.
    """
    if all(c is None for c in self.capacity):
      return self.residual_nbytes * self.calls
    ranks = np.asarray(jax.device_get(self.needed_ranks)).reshape(
        -1, len(self.shape))
    counts = []
    for row in ranks:
      n = math.prod(int(k) for k in row)
      n += sum(i * int(k) for i, k, cap in zip(self.shape, row, self.capacity)
               if cap is not None)
      counts.append(n * self.itemsize)
    return int(sum(counts))


def uncompressed(shape, dtype, method: str, nbytes: int | None = None
                 ) -> CompressionStats:
  """Statistics of a layer without ranks: the shape as ranks, ``nbytes`` saved.

  Args:
    shape: The activation's shape.
    dtype: The activation's dtype.
    method: The method's name.
    nbytes: Bytes of the saved residual; the activation's own when None.
  """
  shape = tuple(int(d) for d in shape)
  n = len(shape)
  itemsize = jnp.dtype(dtype).itemsize
  if nbytes is None:
    nbytes = math.prod(shape) * itemsize
  return CompressionStats(
      needed_ranks=jnp.asarray(shape, jnp.int32).reshape(n),
      kept_ranks=jnp.asarray(shape, jnp.int32).reshape(n),
      kept_energy=jnp.ones((n,), jnp.float32),
      overflow=jnp.asarray(False),
      shape=shape, capacity=(None,) * n, method=method, itemsize=itemsize,
      residual_nbytes=int(nbytes))


class RankOverflowWarning(UserWarning):
  """A layer kept less than ε because its static capacity was too small."""


class RankOverflowError(RuntimeError):
  """Raised (at run time) when ``on_overflow="error"`` and capacity is short."""


ON_OVERFLOW = ("warn", "error", "ignore")
"""What a layer does when ε needs more components than its capacity holds."""


def overflow_message(needed, energy, shape, capacity, eps) -> str:
  """The text of a :class:`RankOverflowWarning` / :class:`RankOverflowError`."""
  needed = [int(n) for n in np.asarray(needed).ravel()]
  energy = [round(float(e), 4) for e in np.asarray(energy).ravel()]
  return (f"activation {tuple(shape)}: eps={eps} needs ranks {needed} but the "
          f"capacity is {list(capacity)}; kept explained variance per mode "
          f"{energy} (< eps). Raise `ranks`/`rank_fraction`, or let the rank "
          "controller grow the capacity.")


def report_overflow(on_overflow: str, eps: float,
                    stats: CompressionStats) -> None:
  """Warns or raises from the device on the steps where capacity is short.

  Args:
    on_overflow: ``"warn"``, ``"error"`` or ``"ignore"``.
    eps: The ε target (for the message).
    stats: The layer's statistics on this step.
  """
  if on_overflow == "ignore":
    return

  def callback(overflow, needed, energy):
    if not np.any(overflow):
      return
    msg = overflow_message(needed, energy, stats.shape, stats.capacity, eps)
    if on_overflow == "error":
      raise RankOverflowError(msg)
    warnings.warn(msg, RankOverflowWarning, stacklevel=2)

  jax.debug.callback(callback, stats.overflow, stats.needed_ranks,
                     stats.kept_energy)


def raise_on_overflow(stats, eps: float | None = None) -> None:
  """Raises :class:`RankOverflowError` if a layer kept less than ε.

  The host-side check for a jitted training loop: ``on_overflow="error"``
  raises from the device through ``jax.debug.callback``, and under
  ``jax.jit`` such an error reaches Python as a ``JaxRuntimeError``, which
  ``except RankOverflowError`` does not catch. Run the layers with
  ``on_overflow="ignore"`` (or ``"warn"``), return their statistics from the
  step, and pass them here.

  Args:
    stats: One :class:`CompressionStats`, or ``{layer: CompressionStats}``
      (e.g. from :func:`lowrank_vjp.flax.collect_stats`), concrete.
    eps: The ε target, for the message (optional).

  Raises:
    RankOverflowError: naming every layer that overflowed.

  Example::

    grads, sown = step(params, batch)           # jitted, on_overflow="ignore"
    lv.raise_on_overflow(lvf.collect_stats(sown))
  """
  items = stats.items() if isinstance(stats, dict) else [("layer", stats)]
  messages = []
  for name, s in items:
    if bool(np.any(jax.device_get(s.overflow))):
      needed = np.asarray(jax.device_get(s.needed_ranks)).reshape(
          -1, len(s.shape)).max(axis=0)
      energy = np.asarray(jax.device_get(s.kept_energy)).reshape(
          -1, len(s.shape)).min(axis=0)
      messages.append(f"{name}: " + overflow_message(
          needed, energy, s.shape, s.capacity, "ε" if eps is None else eps))
  if messages:
    raise RankOverflowError("\n".join(messages))
