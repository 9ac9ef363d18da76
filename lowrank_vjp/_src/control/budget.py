"""Budget mode: per-layer ranks that fit a memory budget with least error.

After the ASI follow-up (Nguyen et al., ICML 2025): calibrate on a few
batches, measure for each layer the weight-gradient error at several ε, then
choose one setting per layer so that the total residual bytes fit the budget
and the summed relative error is smallest (a multiple-choice knapsack, solved
greedily by error reduction per byte). Training then runs at those fixed
ranks (pass the result to :func:`lowrank_vjp.rank_capacities`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_vjp._src.methods import base as methods_base
from lowrank_vjp._src.methods import tucker as tucker_methods
from lowrank_vjp._src.ops import conv as conv_lib
from lowrank_vjp._src.tensor import tucker as tucker_lib


@dataclasses.dataclass(frozen=True)
class LayerSample:
  """Calibration data of one convolution.

  Attributes:
    lhs: Activations, one array ``[N, …]`` per calibration batch.
    cotangents: The output cotangents ``g`` of the same batches.
    rhs_shape: Kernel shape.
    conv_kwargs: ``lax.conv_general_dilated`` keyword arguments
      (``window_strides``, ``padding``, ``dimension_numbers``, …).
  """

  lhs: Sequence[jax.Array]
  cotangents: Sequence[jax.Array]
  rhs_shape: tuple[int, ...]
  conv_kwargs: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class RankOption:
  """One candidate setting of a layer."""

  eps: float
  ranks: tuple[int | None, ...]
  nbytes: int
  error: float


def _options(sample: LayerSample, eps_grid,
             method: tucker_methods.EpsTuckerMethod) -> list[RankOption]:
  rhs = jax.ShapeDtypeStruct(sample.rhs_shape, sample.lhs[0].dtype)
  options = []
  for eps in eps_grid:
    m = dataclasses.replace(method, eps=eps, ranks=None, rank_fraction=1.0,
                            on_overflow="ignore")
    ranks, errors = None, []
    for x, g in zip(sample.lhs, sample.cotangents):
      spec = conv_lib.conv_spec(x, rhs, **sample.conv_kwargs)
      capacity = m.capacity(x.shape, spec.batch_axis)
      res, stats, _ = m.compress_for(spec, x, None)
      approx = m.weight_grad(spec, res, g)
      exact = spec.weight_grad(x, g)
      errors.append(float(jnp.linalg.norm(approx - exact)
                          / jnp.maximum(jnp.linalg.norm(exact), 1e-30)))
      need = np.asarray(stats.needed_ranks)
      ranks = need if ranks is None else np.maximum(ranks, need)
    ranks = tuple(None if c is None else int(r)
                  for c, r in zip(capacity, ranks))
    itemsize = jnp.dtype(sample.lhs[0].dtype).itemsize
    nbytes = tucker_lib.tucker_nbytes(sample.lhs[0].shape, ranks, itemsize, 4)
    options.append(RankOption(eps, ranks, nbytes, float(np.mean(errors))))
  return options


def plan_ranks(samples: Mapping[str, LayerSample], budget_bytes: int,
               eps_grid: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95,
                                            0.99),
               method: tucker_methods.EpsTuckerMethod | str = "hosvd"):
  """Per-layer ranks minimising weight-gradient error within a byte budget.

  Args:
    samples: Layer name to :class:`LayerSample` (a few calibration batches).
    budget_bytes: Total bytes all layers' residuals may occupy.
    eps_grid: Candidate ε per layer.
    method: An ε method (:class:`lowrank_vjp.methods.Hosvd` or
      :class:`~lowrank_vjp.methods.Svd`, or ``"hosvd"`` / ``"svd"``); its ε,
      ranks and ``on_overflow`` are replaced by each candidate's.

  Returns:
    ``(capacities, chosen)``: ``{layer: ranks}`` for
    :func:`lowrank_vjp.rank_capacities`, and ``{layer: RankOption}``.

  Raises:
    ValueError: if even the smallest setting of every layer exceeds the
      budget.
  """
  method = methods_base.resolve(method)
  if not isinstance(method, tucker_methods.EpsTuckerMethod):
    raise ValueError(f"plan_ranks needs an eps method (hosvd or svd), got "
                     f"{method!r}.")
  options = {name: sorted(_options(s, eps_grid, method),
                          key=lambda o: o.nbytes)
             for name, s in samples.items()}
  choice = {name: 0 for name in options}
  used = sum(opts[0].nbytes for opts in options.values())
  if used > budget_bytes:
    raise ValueError(
        f"budget_bytes={budget_bytes} is below the smallest setting of all "
        f"layers ({used} bytes at eps={min(eps_grid)}); raise the budget.")
  while True:
    best, best_gain = None, 0.0
    for name, opts in options.items():
      cur = opts[choice[name]]
      for j in range(choice[name] + 1, len(opts)):
        extra = opts[j].nbytes - cur.nbytes
        gain = cur.error - opts[j].error
        if used + extra <= budget_bytes and gain > 0:
          ratio = gain / max(extra, 1)
          if ratio > best_gain:
            best, best_gain = (name, j), ratio
    if best is None:
      break
    name, j = best
    used += options[name][j].nbytes - options[name][choice[name]].nbytes
    choice[name] = j
  chosen = {name: options[name][j] for name, j in choice.items()}
  return {name: o.ranks for name, o in chosen.items()}, chosen
