"""The HOSVD paper's table and figures, measured by us, and docs/benchmarks.md.

One command measures every part and regenerates the page:

  python experiments/paper_benchmarks.py            # all parts, then the page
  python experiments/paper_benchmarks.py memory     # one part (or several)
  python experiments/paper_benchmarks.py page       # re-render from results

Parts (each writes ``<results>/<part>.json``, stamped with machine, versions
and date; the page is rendered from those files only):

* ``memory``: the paper's setting (224×224, batch 64, float32) for
  MobileNetV2, ResNet18, ResNet34 and MCUNet, fine-tuning the last 2 and 4
  conv layers with every method. A short fine-tuning (``--memory-steps``) on
  real images gives the analytic activation memory (peak and mean over its
  steps, the ranks ε needed); XLA compiles the same training step twice, the
  whole network and the trained tail alone, and its memory analysis gives
  what the compiled step holds.
* ``accuracy``: train.py's default job (pretrained MobileNetV2, Debian's
  Fashion-MNIST at 96 px, batch 32, 200 SGD steps) for every method and
  k ∈ {1, 2, 4, all}, over seeds; mean ± std; a Pareto plot.
* ``variance``: the ranks ε needs per layer and mode, against ε and over
  the training steps (PNGs).
* ``speed``: ``bench_speed.py`` (the four last MobileNetV2 convolutions, and
  a whole fine-tuning step), side by side with vanilla.

For k ≤ 4 every trained layer sits behind one block of the network and every
BatchNorm before it is frozen, so the frozen prefix is computed once per
image (``lowrank_vjp.training.cached_features``) and shared by all methods
and seeds; the results are those of the full network (same arithmetic).
k = all trains the whole network and uses the images.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see train.py

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lowrank_vjp as lv  # noqa: E402
from lowrank_vjp import training  # noqa: E402
from lowrank_vjp.training import cached_features as cf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = training.MiB
PARTS = ("memory", "accuracy", "variance", "speed")
MODELS = ("mobilenet_v2", "resnet18", "resnet34", "mcunet")

# Row label -> settings of the fine-tuned conv layers (lowrank_vjp.flax).
_settings = training.method_settings
METHODS: dict[str, dict[str, Any]] = {
    "vanilla": _settings("vanilla"),  # exact; the layers still report stats
    "gradfilter R2": _settings("gradfilter", method_kwargs={"radius": 2}),
    "SVD ε=0.8": _settings("svd", eps=0.8),
    "SVD ε=0.9": _settings("svd", eps=0.9),
    "HOSVD ε=0.8": _settings("hosvd", eps=0.8),
    "HOSVD ε=0.9": _settings("hosvd", eps=0.9),
    "ASI": _settings("asi"),
    "quant-8": _settings("quant", method_kwargs={"bits": 8}),
    "quant-4": _settings("quant", method_kwargs={"bits": 4}),
}
EPS_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)


# ------------------------------------------------------------ settings ---


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("parts", nargs="*", default=list(PARTS) + ["page"],
                 help=f"any of {PARTS + ('page',)}")
  p.add_argument("--results", default=os.path.join(HERE, "..", "docs",
                                                   "benchmarks"),
                 help="where the JSON results and PNGs go")
  p.add_argument("--page", default=os.path.join(HERE, "..", "docs",
                                                "benchmarks.md"))
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--methods", default=",".join(METHODS),
                 help="comma-separated row labels")
  p.add_argument("--dataset", default="auto")
  p.add_argument("--data-dir", default=None)
  # memory
  p.add_argument("--memory-batch", type=int, default=64)
  p.add_argument("--memory-size", type=int, default=224)
  p.add_argument("--memory-steps", type=int, default=10)
  p.add_argument("--memory-layers", default="2,4")
  # accuracy
  p.add_argument("--accuracy-model", default="mobilenet_v2")
  p.add_argument("--accuracy-layers", default="1,2,4,all")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--all-seeds", type=int, default=1,
                 help="seeds for k = all (the whole network; slow on a CPU)")
  p.add_argument("--all-methods", default="vanilla,gradfilter R2,"
                 "SVD ε=0.9,HOSVD ε=0.8,HOSVD ε=0.9",
                 help="methods run at k = all")
  p.add_argument("--resume", action="store_true",
                 help="accuracy: keep the runs already in <results>/"
                 "accuracy.json (same method, k and seed) and run the rest")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--image-size", type=int, default=96)
  p.add_argument("--eval-examples", type=int, default=2000)
  # speed
  p.add_argument("--speed-args", default="--repeats 5",
                 help="arguments for bench_speed.py")
  return p.parse_args(argv)


def hyper(args, steps: int, batch: int,
          image_size: int) -> training.TrainConfig:
  """train.py's settings (optimizer, schedule, controller) for one setting."""
  return training.TrainConfig(steps=steps, batch_size=batch,
                              image_size=image_size, dataset=args.dataset)


# ----------------------------------------------------------- fine-tune ---


def finetune(net: cf.CutNet, settings, k: int, seed: int, batches, hp,
             log=print) -> training.Run:
  """train.py's loop on ``batches`` (cached features when the trained layers
  are behind ``net.block``), logged."""
  run = cf.finetune(net, settings, k, seed, batches, hp)
  log(f"  {net.name} k={k} {training.method_name(settings)} seed {seed}: "
      f"{len(run.rows)} steps, last loss {run.rows[-1]['loss']:.3f}")
  return run


# --------------------------------------------------------------- parts ---


def selected_methods(args) -> dict[str, Any]:
  names = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in names if m not in METHODS]
  if unknown:
    raise SystemExit(f"--methods: unknown {unknown}; known: {list(METHODS)}")
  return {m: METHODS[m] for m in names}


def part_memory(args, splits, save, log=print) -> dict:
  cells = []
  methods = selected_methods(args)
  ks = [int(k) for k in args.memory_layers.split(",")]
  b, s = args.memory_batch, args.memory_size
  hp = hyper(args, args.memory_steps, b, s)
  for name in args.models.split(","):
    net = cf.load_net(name, splits["train"].num_classes, s, b, max(ks))
    t0 = time.perf_counter()
    batches = cf.cached_batches(net, splits["train"], args.memory_steps, b, 0)
    log(f"{name}: features at {net.block} "
        f"{tuple(batches[0][0].shape)} in {time.perf_counter() - t0:.0f} s")
    labels = jax.ShapeDtypeStruct((b,), jnp.int32)
    for k in ks:
      for label, settings in methods.items():
        cell = {"model": name, "k": k, "method": label,
                "pretrained": net.weights is not None}
        why = training.unsupported(settings)
        if why:
          cells.append({**cell, "skipped": why})
          continue
        run = finetune(net, settings, k, 0, batches, hp, log)
        cell.update(training.summarise(run.rows))
        tail, whole = cf.step_memory(net, run, batches[0][0].shape, labels)
        cell.update({
            # Estimated peaks of identically built (donated) programs; the
            # temp bytes alone move with donation.
            "xla_tail_peak_mib": tail.peak_bytes / MiB,
            "xla_whole_peak_mib": whole.peak_bytes / MiB,
            "xla_tail_temp_mib": tail.temp_bytes / MiB,
            "xla_whole_temp_mib": whole.temp_bytes / MiB,
            "capacities": None if run.controller is None else {
                p: list(c) for p, c in run.controller.capacities.items()},
            "ranks_per_step": {p: [r["ranks"][p] for r in run.rows]
                               for p in run.plan.compressed_paths
                               if p in run.rows[0]["ranks"]},
        })
        cells.append(cell)
        save(memory_result(args, cells))
  return memory_result(args, cells)


def memory_result(args, cells) -> dict:
  return {"setting": {"batch": args.memory_batch,
                      "image_size": args.memory_size,
                      "steps": args.memory_steps, "dataset": args.dataset},
          "cells": cells}


def part_accuracy(args, splits, save, log=print) -> dict:
  methods = selected_methods(args)
  b, s = args.batch_size, args.image_size
  hp = hyper(args, args.steps, b, s)
  net = cf.load_net(args.accuracy_model, splits["train"].num_classes, s, b, 4)
  ks = [k.strip() for k in args.accuracy_layers.split(",")]
  runs = []
  eval_feats = cf.eval_inputs(net, splits["test"], args.eval_examples)
  eval_images = None
  all_methods = [m.strip() for m in args.all_methods.split(",")]
  # Every seed of the cached runs first; k = all (slow) last.
  order = ([(seed, k) for seed in range(args.seeds) for k in ks
            if k != "all"] + [(seed, "all") for seed in range(args.all_seeds)
                              if "all" in ks])
  done = {}
  previous = os.path.join(args.results, "accuracy.json")
  if args.resume and os.path.exists(previous):
    with open(previous) as f:
      done = {(r["method"], r["k"], r["seed"]): r
              for r in json.load(f)["runs"] if "skipped" not in r}
    log(f"  resuming: {len(done)} runs already measured")
  batches = {}
  for seed, k_text in order:
    k = net.k_all() if k_text == "all" else int(k_text)
    for label, settings in methods.items():
      if k_text == "all" and label not in all_methods:
        continue
      cell = {"k": k_text, "method": label, "seed": seed}
      if (label, k_text, seed) in done:
        runs.append(done[label, k_text, seed])
        continue
      why = training.unsupported(settings)
      if why:
        runs.append({**cell, "skipped": why})
        continue
      t0 = time.perf_counter()
      if k_text == "all":
        if eval_images is None:
          eval_images = cf.eval_inputs(net, splits["test"],
                                       args.eval_examples, cached=False)
        if ("images", seed) not in batches:
          batches = {("images", seed): cf.image_batches(
              splits["train"], args.steps, b, seed, s)}
        run = finetune(net, settings, k, seed, batches["images", seed], hp,
                       log)
        accuracy = cf.evaluate_run(net, run, *eval_images)
      else:
        if ("features", seed) not in batches:
          batches = {("features", seed): cf.cached_batches(
              net, splits["train"], args.steps, b, seed)}
        run = finetune(net, settings, k, seed, batches["features", seed], hp,
                       log)
        accuracy = cf.evaluate_run(net, run, *eval_feats)
      cell.update(training.summarise(run.rows))
      cell.update({"accuracy": accuracy, "layers": k,
                   "wall_s": time.perf_counter() - t0,
                   "final_loss": run.rows[-1]["loss"]})
      if (seed == 0 and k_text == "4"
          and isinstance(lv.methods.resolve(settings), lv.methods.Hosvd)):
        cell["ranks_per_step"] = {
            p: [r["ranks"][p] for r in run.rows]
            for p in run.plan.compressed_paths}
      runs.append(cell)
      save(accuracy_result(args, net, hp, eval_feats, all_methods, runs))
  result = accuracy_result(args, net, hp, eval_feats, all_methods, runs)
  result["resumed_runs"] = len(done)
  return result


def accuracy_result(args, net, hp, eval_feats, all_methods, runs) -> dict:
  b, s = args.batch_size, args.image_size
  return {"setting": {"model": args.accuracy_model,
                      "pretrained": net.weights is not None,
                      "dataset": args.dataset, "steps": args.steps,
                      "batch": b, "image_size": s,
                      "eval_examples": int(len(eval_feats[1])),
                      "all_seeds": args.all_seeds,
                      "all_methods": all_methods,
                      "optimizer": f"SGD momentum {hp.momentum}, lr {hp.lr} "
                                   f"cosine, {hp.warmup_steps} warm-up "
                                   f"steps, clip {hp.clip_grad_norm}"},
          "runs": runs}


def part_variance(args, splits, save, log=print) -> dict:
  """Ranks ε needs per layer and mode at the paper's setting."""
  b, s = args.memory_batch, args.memory_size
  net = cf.load_net("mobilenet_v2", splits["train"].num_classes, s, b, 4)
  feats, _ = cf.cached_batches(net, splits["train"], 1, b, 0)[0]
  out = {}
  for eps in EPS_GRID:
    settings = training.method_settings(
        "hosvd", eps=eps, method_kwargs={"rank_fraction": 1.0})
    out[str(eps)] = cf.needed_ranks(net, feats, settings, 4)
    log(f"  ε={eps}: {out[str(eps)]}")
  paths = [layer.path for layer in net.layers]
  shapes = {p: list(net.layers[paths.index(p)].input_shape)
            for p in out[str(EPS_GRID[0])]}
  return {"setting": {"model": "mobilenet_v2", "batch": b, "image_size": s,
                      "pretrained": net.weights is not None,
                      "dataset": args.dataset},
          "shapes": shapes, "ranks_vs_eps": out}


def part_speed(args, log=print) -> dict:
  path = os.path.join(args.results, "speed_raw.json")
  cmd = [sys.executable, os.path.join(HERE, "bench_speed.py"), "--json",
         path] + args.speed_args.split()
  log("  " + " ".join(cmd))
  subprocess.run(cmd, check=True)
  with open(path) as f:
    result = json.load(f)
  os.remove(path)
  return result


def main(argv=None) -> None:
  args = parse_args(argv)
  unknown = set(args.parts) - set(PARTS) - {"page"}
  if unknown:
    raise SystemExit(f"unknown parts {sorted(unknown)}; choose from "
                     f"{PARTS + ('page',)}")
  os.makedirs(args.results, exist_ok=True)
  if args.dataset == "auto":
    args.dataset = training.default_dataset()
  splits = None
  for part in PARTS:
    if part not in args.parts:
      continue
    t0 = time.perf_counter()
    print(f"== {part}")

    def save(result, part=part, t0=t0, partial=True):
      result.update(environment=training.environment(), partial=partial,
                    command="python experiments/paper_benchmarks.py " + part,
                    wall_s=time.perf_counter() - t0)
      with open(os.path.join(args.results, f"{part}.json"), "w") as f:
        json.dump(result, f, indent=1)

    if part == "speed":
      result = part_speed(args)
    else:
      if splits is None:
        splits = training.load(args.dataset, args.data_dir)
      result = globals()[f"part_{part}"](args, splits, save)
    save(result, partial=False)
    print(f"== {part}: {result['wall_s']:.0f} s")
  if "page" in args.parts:
    training.benchmarks_page.write(args.results, args.page)
    print(f"wrote {args.page}")


if __name__ == "__main__":
  main()
