"""The experiments' figures (PNG), drawn with matplotlib's Agg backend.

matplotlib is imported by :func:`pyplot` when a figure is drawn; each
function returns None (draws nothing) when it is not installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from lowrank_vjp.training import methods
from lowrank_vjp.training.metrics import read_metrics

MODES = ("batch", "height", "width", "channel")
"""Names of the modes of an ``[N, H, W, C]`` activation."""

TOKEN_MODES = ("batch", "token", "feature")
"""Names of the modes of a ``[B, T, C]`` activation."""

MAX_RANK_PANELS = 8
"""Layers shown per run in ``ranks.png`` (spread over the network)."""


def _mode_names(ndim: int) -> tuple[str, ...]:
  return {4: MODES, 3: TOKEN_MODES}.get(ndim, tuple(f"mode {i}" for i in
                                                    range(ndim)))

_LINES = ("-", "--", ":", "-.")


def pyplot():
  """``matplotlib.pyplot`` on the Agg backend, or None if not installed."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return plt


# ------------------------------------------------------------- train.py ---


def plot_runs(reports: Sequence[Mapping], workdir: str,
              run_dirs: Mapping[str, str]) -> list[str]:
  """train.py's figures: accuracy against memory, ranks over steps, and
  validation loss over steps (when the runs evaluated during training).

  Args:
    reports: The runs' reports (:func:`~lowrank_vjp.training.make_report`).
    workdir: Where ``accuracy_vs_memory.png``, ``ranks.png`` and
      ``val_loss.png`` go.
    run_dirs: ``{run label: directory holding its metrics.jsonl}``.

  Returns:
    The PNGs' paths (none if matplotlib is missing; it says so).
  """
  plt = pyplot()
  if plt is None:
    print("matplotlib is not installed: no plots")
    return []
  paths = []
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in reports:
    ax.scatter(r["activation_memory_analytic_peak_mib"], 100 * r["accuracy"],
               s=40)
    ax.annotate(r["run"], (r["activation_memory_analytic_peak_mib"],
                           100 * r["accuracy"]), textcoords="offset points",
                xytext=(5, 5), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("activation memory, analytic peak (MiB, log scale)")
  ax.set_ylabel("test top-1 accuracy (%)")
  r0 = reports[0]
  ax.set_title(f"{r0['model']}, {len(r0['layers'])} compressed layers, "
               f"{r0['dataset']}", fontsize=9)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(workdir, "accuracy_vs_memory.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  # Only runs with ε-ranks: the others keep every mode whole.
  compressed = [r for r in reports if methods.uses_ranks(r["settings"])]
  if compressed:
    layers = compressed[0]["layers"]
    if len(layers) > MAX_RANK_PANELS:
      pick = np.linspace(0, len(layers) - 1, MAX_RANK_PANELS).round()
      layers = [layers[int(i)] for i in pick]
    fig, axes = plt.subplots(len(compressed), len(layers), squeeze=False,
                             figsize=(3.2 * len(layers),
                                      2.6 * len(compressed)))
    for i, r in enumerate(compressed):
      rows = read_metrics(os.path.join(run_dirs[r["run"]], "metrics.jsonl"),
                          10**12)
      steps = [row["step"] for row in rows]
      for j, path in enumerate(layers):
        ax = axes[i][j]
        hist = np.asarray([row["ranks"][path] for row in rows])
        for mode, name in enumerate(_mode_names(hist.shape[1]) if hist.size
                                    else ()):
          ax.plot(steps, hist[:, mode], label=name,
                  linestyle=_LINES[mode % 4])
        ax.set_title(f"{r['run']}\n{path}", fontsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
        if j == 0:
          ax.set_ylabel("rank needed for ε", fontsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "ranks.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  curve = plot_val_loss(reports, workdir, run_dirs)
  return paths + ([curve] if curve else [])


def val_loss_curves(reports: Sequence[Mapping], run_dirs: Mapping[str, str]
                    ) -> dict[str, tuple[list[int], list[float]]]:
  """``{run: (steps, validation losses)}``: the evaluations during training
  (``val_loss`` in ``metrics.jsonl``) and the final one (the report's)."""
  curves = {}
  for r in reports:
    rows = read_metrics(os.path.join(run_dirs[r["run"]], "metrics.jsonl"),
                        10**12)
    points = [(row["step"], row["val_loss"]) for row in rows
              if row.get("val_loss") is not None]
    if r.get("val_loss") is not None:
      points.append((r["steps"], r["val_loss"]))
    if points:
      curves[r["run"]] = ([p[0] for p in points], [p[1] for p in points])
  return curves


def plot_val_loss(reports: Sequence[Mapping], workdir: str,
                  run_dirs: Mapping[str, str]) -> str | None:
  """``val_loss.png``: validation loss over steps, one line per run.

  Returns:
    Its path, or None when no run evaluated more than once (or matplotlib
    is missing).
  """
  curves = val_loss_curves(reports, run_dirs)
  plt = pyplot()
  if plt is None or not any(len(s) > 1 for s, _ in curves.values()):
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (run, (steps, losses)) in enumerate(curves.items()):
    ax.plot(steps, losses, marker="o", markersize=3, label=run,
            linestyle=_LINES[i % 4])
  r0 = reports[0]
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (cross-entropy, nats)")
  ax.set_title(f"{r0['model']}, {r0['dataset']}", fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(workdir, "val_loss.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ------------------------------------------------------ benchmarks page ---


def _group(runs):
  groups = {}
  for r in runs:
    if "skipped" not in r:
      groups.setdefault((r["method"], r["k"]), []).append(r)
  return groups


def plot_pareto(result: Mapping, results_dir: str) -> str | None:
  """Accuracy (mean ± std over seeds) against peak memory, by method and k.

  Args:
    result: The ``accuracy`` part of paper_benchmarks.
    results_dir: Where ``pareto.png`` goes.

  Returns:
    The page's link to it (``benchmarks/pareto.png``), or None.
  """
  plt = pyplot()
  if plt is None:
    return None
  groups = _group(result["runs"])
  names = list(dict.fromkeys(m for m, _ in groups))
  ks = list(dict.fromkeys(k for _, k in groups))
  markers = dict(zip(ks, "os^Dv", strict=False))
  colors = dict(zip(names, plt.get_cmap("tab10").colors, strict=False))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for (m, k), rs in groups.items():
    acc = 100 * np.asarray([r["accuracy"] for r in rs])
    mem = np.mean([r["analytic_peak_mib"] for r in rs])
    ax.errorbar(mem, acc.mean(), yerr=acc.std(), fmt=markers[k],
                color=colors[m], capsize=2, markersize=6)
  for m in names:
    ax.plot([], [], "o", color=colors[m], label=m)
  for k in ks:
    ax.plot([], [], markers[k], color="gray", label=f"k = {k}")
  ax.set_xscale("log")
  ax.set_xlabel("peak activation memory, analytic (MiB, log)")
  ax.set_ylabel("top-1 % (mean ± std over seeds)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, ncol=2, loc="lower right")
  fig.tight_layout()
  name = "pareto.png"
  fig.savefig(os.path.join(results_dir, name), dpi=110)
  plt.close(fig)
  return f"benchmarks/{name}"


def plot_ranks_vs_eps(result: Mapping, results_dir: str) -> str | None:
  """Rank / axis length per mode against ε, one panel per layer.

  Args:
    result: The ``variance`` part of paper_benchmarks.
    results_dir: Where ``ranks_vs_eps.png`` goes.

  Returns:
    The page's link to it, or None.
  """
  plt = pyplot()
  if plt is None:
    return None
  eps = sorted(result["ranks_vs_eps"], key=float)
  paths = list(result["shapes"])
  fig, axes = plt.subplots(1, len(paths), figsize=(3.2 * len(paths), 3),
                           squeeze=False)
  for ax, path in zip(axes[0], paths, strict=False):
    ranks = np.asarray([result["ranks_vs_eps"][e][path] for e in eps])
    shape = result["shapes"][path]
    for mode in range(ranks.shape[1]):
      ax.plot([float(e) for e in eps], ranks[:, mode] / shape[mode],
              marker="o", markersize=3,
              label=f"{MODES[mode]} ({shape[mode]})")
    ax.set_title(path, fontsize=8)
    ax.set_xlabel("ε", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
  axes[0][0].set_ylabel("rank / axis length", fontsize=8)
  fig.tight_layout()
  name = "ranks_vs_eps.png"
  fig.savefig(os.path.join(results_dir, name), dpi=100)
  plt.close(fig)
  return f"benchmarks/{name}"


def plot_ranks_over_steps(accuracy: Mapping, results_dir: str) -> str | None:
  """Ranks per mode over the training steps of the runs that kept them.

  Args:
    accuracy: The ``accuracy`` part of paper_benchmarks.
    results_dir: Where ``ranks_over_steps.png`` goes.

  Returns:
    The page's link to it, or None (also when no run kept its ranks).
  """
  plt = pyplot()
  runs = [r for r in accuracy["runs"] if "ranks_per_step" in r]
  if plt is None or not runs:
    return None
  paths = list(runs[0]["ranks_per_step"])
  fig, axes = plt.subplots(len(runs), len(paths), squeeze=False,
                           figsize=(3.2 * len(paths), 2.6 * len(runs)))
  for i, r in enumerate(runs):
    for j, path in enumerate(paths):
      ax = axes[i][j]
      hist = np.asarray(r["ranks_per_step"][path])
      for mode in range(hist.shape[1]):
        ax.plot(np.arange(1, len(hist) + 1), hist[:, mode],
                label=MODES[mode], linestyle=_LINES[mode])
      ax.set_title(f"{r['method']}\n{path}", fontsize=7)
      ax.set_xlabel("step", fontsize=7)
      ax.tick_params(labelsize=7)
      ax.legend(fontsize=6)
  fig.tight_layout()
  name = "ranks_over_steps.png"
  fig.savefig(os.path.join(results_dir, name), dpi=100)
  plt.close(fig)
  return f"benchmarks/{name}"


# ------------------------------------------------------------- tdlrt.py ---


def plot_compression(results: Mapping[str, Mapping], path: str) -> str | None:
  """tdlrt.py's figure: test accuracy against compression rate.

  Args:
    results: ``{run: entry}`` with ``method`` (``"tdlrt"``, ``"tucker"``,
      ``"matrix"``, ``"full"``), ``accuracy`` and
      ``compression["compression_rate"]``; runs named ``…+hosvd`` and
      ``full`` are marked alone.
    path: The PNG's path.

  Returns:
    ``path``, or None if matplotlib is missing (it says so).
  """
  plt = pyplot()
  if plt is None:
    print("matplotlib not installed: no plot (pip install matplotlib)")
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  styles = {"tdlrt": "o-", "tucker": "s--", "matrix": "^:"}
  labels = {"tdlrt": "TDLRT", "tucker": "vanilla Tucker",
            "matrix": "matrix factorization"}
  for method, style in styles.items():
    pts = sorted((e["compression"]["compression_rate"], e["accuracy"])
                 for k, e in results.items()
                 if e["method"] == method and "+hosvd" not in k)
    if pts:
      ax.plot(*zip(*pts, strict=False), style, label=labels[method])
  for k, e in results.items():
    if "+hosvd" in k or k == "full":
      ax.plot(e["compression"]["compression_rate"], e["accuracy"],
              "k*" if k == "full" else "rx", label=k)
  ax.set_xlabel("compression rate (1 − parameters kept / full)")
  ax.set_ylabel("test accuracy (digits)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
