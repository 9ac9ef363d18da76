"""A fair comparison of TDLRT with its baselines: the pieces of
``experiments/tdlrt_study.py``.

* :func:`optimizer`: the one optimizer every method trains with (AdamW on a
  cosine schedule, gradients clipped by global norm), as in the reference
  implementation's training loop;
* :func:`validation_split`: a validation set carved from the training set,
  so that learning rates are chosen without the test set;
* :func:`uniform_ranks`: one rank fraction for every factorized layer,
  sized to a parameter budget (the baseline a user without TDLRT's ranks
  would pick);
* :func:`condition_core`: an ill-conditioned initial core, for the
  robustness-to-initialisation runs;
* :func:`select` and :func:`paired_interval`: the learning rate with the best
  mean validation accuracy, and paired differences over seeds with a
  Student-t 95 % confidence interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import optax

from lowrank_vjp import tdlrt as lt
from lowrank_vjp._src.tensor import algebra


def optimizer(lr: float, steps: int, *, weight_decay: float = 1e-4,
              clip: float = 1.0) -> optax.GradientTransformation:
  """AdamW with cosine decay from ``lr`` over ``steps``, clipped gradients.

  Args:
    lr: Peak learning rate.
    steps: Optimizer steps of the whole run (the schedule's length).
    weight_decay: AdamW's decoupled weight decay.
    clip: Global-norm clipping threshold of the gradients.
  """
  return optax.chain(
      optax.clip_by_global_norm(clip),
      optax.adamw(optax.cosine_decay_schedule(lr, max(1, steps)),
                  weight_decay=weight_decay))


def validation_split(x: np.ndarray, y: np.ndarray, every: int = 5):
  """``((x_train, y_train), (x_val, y_val))``: every ``every``-th example of
  the training set held out for validation."""
  val = np.arange(len(x)) % every == 0
  return (x[~val], y[~val]), (x[val], y[val])


def tucker_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
  """Parameters of a Tucker kernel of ``shape`` at ``ranks``."""
  return lt.param_count(tuple(shape), tuple(ranks))


def uniform_ranks(shapes: Mapping[str, Sequence[int]], target: int,
                  modes: Sequence[int] = (-2, -1)) -> dict[str, tuple]:
  """Ranks with one fraction ``f`` of every layer's ``modes`` (the others
  full) whose total Tucker parameter count is closest to ``target``.

  Args:
    shapes: Kernel shape per layer.
    target: The parameter budget, summed over the layers.
    modes: The modes that get rank ``max(1, round(f · n))``.

  Returns:
    ``{layer: ranks}``.

  Example:
    >>> uniform_ranks({"a": (3, 3, 16, 32)},
    ...               tucker_params((3, 3, 16, 32), (3, 3, 8, 16)))
    {'a': (3, 3, 8, 16)}
  """
  def ranks_at(f):
    out = {}
    for name, shape in shapes.items():
      picked = {m % len(shape) for m in modes}
      out[name] = tuple(max(1, round(f * n)) if i in picked else n
                        for i, n in enumerate(shape))
    return out

  best, best_err = None, math.inf
  for f in np.linspace(0.0, 1.0, 1001):
    r = ranks_at(float(f))
    err = abs(sum(tucker_params(shapes[n], r[n]) for n in shapes) - target)
    if err < best_err:
      best, best_err = r, err
  return best


def condition_core(w: lt.TuckerWeight, ratio: float) -> lt.TuckerWeight:
  """``w`` with its core scaled along every mode by ``diag(d)``, ``d`` a
  geometric sequence from 1 to ``1 / ratio`` over the active rank: an
  initial core whose unfoldings have condition numbers of about ``ratio``
  times their original ones."""
  ranks = [int(r) for r in np.asarray(w.ranks())]
  core = w.core
  for i, (cap, r) in enumerate(zip(core.shape, ranks, strict=True)):
    d = np.ones(cap, np.float32)
    d[:r] = np.geomspace(1.0, 1.0 / ratio, r) if r > 1 else 1.0
    core = algebra.mode_dot(core, jnp.diag(jnp.asarray(d, core.dtype)), i)
  return lt.TuckerWeight(core, w.factors, w.shape)


def select(val_acc: Mapping[float, Sequence[float]]) -> float:
  """The learning rate whose mean validation accuracy over seeds is highest
  (the smaller rate on a tie).

  Args:
    val_acc: ``{lr: [accuracy per seed]}``.
  """
  return max(sorted(val_acc), key=lambda lr: (float(np.mean(val_acc[lr])),
                                              -lr))


def paired_interval(a: Sequence[float], b: Sequence[float],
                    level: float = 0.95) -> dict[str, float]:
  """Mean of ``a − b`` over paired seeds with a Student-t interval.

  Args:
    a: One value per seed.
    b: The paired values (same seeds, same order).
    level: Confidence level.

  Returns:
    ``{"mean", "low", "high", "sd", "n", "wins"}``: ``wins`` counts the
    seeds where ``a > b``. With one seed the interval is infinite.

  Raises:
    ValueError: for lengths that differ or are zero.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size == 0:
    raise ValueError(f"paired_interval needs two equal, non-empty 1-D "
                     f"sequences, got shapes {a.shape} and {b.shape}.")
  d = a - b
  n = d.size
  mean = float(d.mean())
  if n == 1:
    return {"mean": mean, "low": -math.inf, "high": math.inf, "sd": 0.0,
            "n": 1, "wins": int(d[0] > 0)}
  sd = float(d.std(ddof=1))
  half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
  return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd,
          "n": n, "wins": int(np.sum(d > 0))}


def summarize(runs: Sequence[Mapping], reference: str = "tdlrt") -> dict:
  """Selection and paired comparison of a study's runs.

  Args:
    runs: One mapping per run with ``method``, ``lr``, ``seed``,
      ``val_accuracy``, ``test_accuracy`` and ``params_kept``.
    reference: The method the others are compared with.

  Returns:
    ``{method: {"lr", "val_by_lr", "test", "test_mean", "params_kept_mean",
    "seeds", "minus_reference"}}``: the selected learning rate (best mean
    validation accuracy), mean validation accuracy per rate, the test
    accuracies at the selected rate (seed order), and the paired interval of
    ``test − reference's test`` over the seeds both have (absent for the
    reference itself).
  """
  methods = sorted({r["method"] for r in runs})
  out = {}
  for m in methods:
    mine = [r for r in runs if r["method"] == m]
    val = {}
    for r in mine:
      val.setdefault(r["lr"], []).append(r["val_accuracy"])
    lr = select(val)
    at = sorted((r for r in mine if r["lr"] == lr), key=lambda r: r["seed"])
    out[m] = {"lr": lr,
              "val_by_lr": {str(k): float(np.mean(v)) for k, v in
                            sorted(val.items())},
              "seeds": [r["seed"] for r in at],
              "test": [r["test_accuracy"] for r in at],
              "test_mean": float(np.mean([r["test_accuracy"] for r in at])),
              "params_kept_mean": float(np.mean([r["params_kept"]
                                                 for r in at]))}
  if reference in out:
    ref = dict(zip(out[reference]["seeds"], out[reference]["test"],
                   strict=True))
    for m, e in out.items():
      if m == reference:
        continue
      seeds = [s for s in e["seeds"] if s in ref]
      if seeds:
        mine = dict(zip(e["seeds"], e["test"], strict=True))
        e["minus_reference"] = paired_interval(
            [mine[s] for s in seeds], [ref[s] for s in seeds])
  return out


def table(summary: Mapping, reference: str = "tdlrt") -> str:
  """A Markdown table of :func:`summarize`'s result (accuracies in %)."""
  lines = [f"| method | lr | seeds | test acc. % (mean) | params kept "
           f"(mean) | − {reference}, points (95 % CI) | seeds ahead |",
           "|---|---|---|---|---|---|---|"]
  for m, e in summary.items():
    d = e.get("minus_reference")
    diff = ("—" if d is None else
            f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, "
            f"{100 * d['high']:+.2f}]")
    ahead = "—" if d is None else f"{d['wins']}/{d['n']}"
    lines.append(f"| {m} | {e['lr']:g} | {len(e['seeds'])} | "
                 f"{100 * e['test_mean']:.2f} | {e['params_kept_mean']:.0f} | "
                 f"{diff} | {ahead} |")
  return "\n".join(lines)
