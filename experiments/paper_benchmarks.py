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
image (:mod:`cached_features`) and shared by all methods and seeds; the
results are those of the full network (same arithmetic). k = all trains the
whole network and uses the images.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see train.py

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchmarks_page  # noqa: E402  pylint: disable=g-import-not-at-top
import cached_features  # noqa: E402  pylint: disable=g-import-not-at-top
import data as data_lib  # noqa: E402  pylint: disable=g-import-not-at-top
import train  # noqa: E402  pylint: disable=g-import-not-at-top

import lowrank_vjp as lv  # noqa: E402  pylint: disable=g-import-not-at-top
import lowrank_vjp.flax as lvf  # noqa: E402  pylint: disable=g-import-not-at-top
import lowrank_vjp.rules as lvr  # noqa: E402  pylint: disable=g-import-not-at-top
from lowrank_vjp import models  # noqa: E402  pylint: disable=g-import-not-at-top

MiB = float(2**20)
PARTS = ("memory", "accuracy", "variance", "speed")
MODELS = ("mobilenet_v2", "resnet18", "resnet34", "mcunet")

# Row label -> settings of the fine-tuned conv layers (lowrank_vjp.flax).
METHODS: dict[str, dict[str, Any] | None] = {
    "vanilla": {"method": "none"},  # exact; the layers still report stats
    "gradfilter R2": {"method": "gradfilter", "radius": 2},
    "SVD ε=0.8": {"method": "svd", "eps": 0.8, "on_overflow": "ignore"},
    "SVD ε=0.9": {"method": "svd", "eps": 0.9, "on_overflow": "ignore"},
    "HOSVD ε=0.8": {"method": "hosvd", "eps": 0.8, "on_overflow": "ignore"},
    "HOSVD ε=0.9": {"method": "hosvd", "eps": 0.9, "on_overflow": "ignore"},
    "ASI": {"method": "asi"},
    "quant-8": {"method": "quant", "bits": 8},
    "quant-4": {"method": "quant", "bits": 4},
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


def environment() -> dict[str, str]:
  """Machine, versions and date, stamped on every result file."""
  import flax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {
      "date": datetime.date.today().isoformat(),
      "device": f"{device.platform}:{device.device_kind}",
      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
      "jax": jax.__version__, "flax": flax.__version__,
      "python": platform.python_version(),
  }


def hyper(args, steps: int, batch: int, image_size: int) -> argparse.Namespace:
  """train.py's flags (optimizer, schedule, controller) for one setting."""
  return train.parse_args(["--steps", str(steps), "--batch-size", str(batch),
                           "--image-size", str(image_size),
                           "--dataset", args.dataset])


# ------------------------------------------------------------- network ---


@dataclasses.dataclass
class Net:
  """A model ready to fine-tune, cut where the trained layers begin."""

  name: str
  spec: models.ModelSpec
  model: Any
  variables: Any
  layers: tuple[lvr.Layer, ...]
  image_size: int
  weights: str | None
  block: str | None           # the cut (None: no cache)
  tail: cached_features.FromBlock | None

  @property
  def first_order(self) -> int:
    """Call order of the first layer behind the cut."""
    return min(layer.order for layer in self.layers
               if layer.path.startswith(self.block + "/"))

  def k_all(self) -> int:
    """How many conv layers "all" is (the papers' count)."""
    return sum(1 for layer in self.layers if layer.kind == "conv"
               and not (self.spec.exclude
                        and re.fullmatch(self.spec.exclude, layer.path)))


def load_net(name: str, num_classes: int, image_size: int, batch: int,
             max_k: int = 4) -> Net:
  """The model (ImageNet weights when they install offline), cut before its
  last ``max_k`` conv layers."""
  spec = models.get_spec(name)
  weights = models.default_weights(name)
  if weights is not None:
    model, variables = models.pretrained(name, num_classes, weights=weights,
                                         image_size=image_size)
  else:
    model = spec.build(num_classes=num_classes)
    variables = models.init(model, image_size, 0)
  shape = (batch, image_size, image_size, 3)
  layers = lvr.discover(model, jax.ShapeDtypeStruct(shape, jnp.float32),
                        variables=variables, train=True)
  trained = lvr.last_k(layers, max_k, exclude=spec.exclude)
  block = cached_features.cut_block(trained)
  tail = (cached_features.FromBlock(model, block, shape)
          if block is not None else None)
  return Net(name, spec, model, variables, layers, image_size, weights,
             block, tail)


def featurizer(net: Net):
  """``images -> block inputs`` (jitted), frozen BatchNorms."""
  @jax.jit
  def run(variables, images):
    return cached_features.block_inputs(
        net.model, variables, models.preprocess(images, net.image_size),
        net.block, train=False)
  return lambda images: run(net.variables, images)


def cached_batches(net: Net, split, steps: int, batch: int, seed: int):
  """``(features, labels)`` for each step, as train.py draws the batches."""
  feats = featurizer(net)
  out = []
  for step in range(steps):
    images, labels = split.get(split.batch_indices(step, batch, seed),
                               net.image_size)
    out.append((feats(images), jnp.asarray(labels)))
  return out


# ----------------------------------------------------------- fine-tune ---


@dataclasses.dataclass
class Run:
  plan: lvr.Plan
  state: dict
  frozen: dict
  rows: list[dict]
  controller: lv.RankController | None
  step_fn: Any
  tx: Any
  cached: bool

  def capacities(self):
    return None if self.controller is None else self.controller.key()


def finetune(net: Net, settings, k: int, seed: int, batches, hp,
             log=print) -> Run:
  """train.py's loop: ``len(batches)`` steps on ``batches[i] = (x, labels)``
  (cached features when the trained layers are behind ``net.block``)."""
  rules = lvr.fine_tune_last(net.layers, k, settings,
                             exclude=net.spec.exclude, head=net.spec.head)
  plan = lvr.make_plan(net.layers, rules)
  cached = net.tail is not None and all(
      plan.layer(p).order >= net.first_order for p in plan.trainable)
  trained, frozen = plan.split(net.variables)
  trained = jax.tree.map(jnp.copy, trained)  # the step donates its state
  tx = train.make_optimizer(hp)
  x0 = (batches[0][0] if cached else jax.ShapeDtypeStruct(
      (len(batches[0][1]), net.image_size, net.image_size, 3), jnp.float32))
  state = train.initial_state(trained, tx, train.init_asi_state(
      net.tail if cached else net.model, plan, net.variables, x0))
  method = settings["method"]
  controller = (lv.RankController(patience=hp.rank_patience,
                                  headroom=hp.rank_headroom)
                if method in ("hosvd", "svd") else None)
  step_fn = train.make_train_step(
      net.tail if cached else net.model, plan, tx, seed,
      None if cached else net.image_size, donate=controller is None)
  rows = []
  for x, labels in batches:
    t = time.perf_counter()
    state, metrics = train.run_step(step_fn, controller, state, frozen, x,
                                    labels)
    dt = time.perf_counter() - t
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"non-finite loss {loss}")
    rows.append({"loss": loss, "step_time_s": dt,
                 **train.stats_row(metrics["stats"])})
  log(f"  {net.name} k={k} {method} seed {seed}: "
      f"{len(rows)} steps, last loss {rows[-1]['loss']:.3f}")
  return Run(plan, state, frozen, rows, controller, step_fn, tx, cached)


def evaluate(net: Net, run: Run, inputs, labels, batch: int = 250) -> float:
  variables = train.final_variables(run.plan, run.state, run.frozen)
  model = net.tail if run.cached else net.model

  @jax.jit
  def predict(v, x):
    if not run.cached:
      x = models.preprocess(x, net.image_size)
    return jnp.argmax(model.apply(v, x, train=False), -1)

  correct = 0
  for s in range(0, len(labels), batch):
    correct += int(jnp.sum(predict(variables, inputs[s:s + batch])
                           == labels[s:s + batch]))
  return correct / len(labels)


def summarise(rows: list[dict]) -> dict[str, float]:
  mem = np.asarray([r["activation_memory_analytic_mib"] for r in rows])
  return {
      "analytic_peak_mib": float(mem.max()),
      "analytic_mean_mib": float(mem.mean()),
      "vanilla_mib": rows[-1]["activation_memory_vanilla_mib"],
      "capacity_mib": rows[-1]["activation_memory_capacity_mib"],
      "step_time_median_s": float(np.median([r["step_time_s"]
                                             for r in rows[1:] or rows])),
  }


# --------------------------------------------------------------- parts ---


def selected_methods(args) -> dict[str, Any]:
  names = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in names if m not in METHODS]
  if unknown:
    raise SystemExit(f"--methods: unknown {unknown}; known: {list(METHODS)}")
  return {m: METHODS[m] for m in names}


def _supported(settings) -> str | None:
  """Why a method cannot run through the Flax adapters here, or None."""
  try:
    lvf.conv_cls(**settings)
  except (TypeError, ValueError) as e:
    return f"not available in lowrank_vjp.flax: {e}"
  return None


def part_memory(args, splits, save, log=print) -> dict:
  cells = []
  methods = selected_methods(args)
  ks = [int(k) for k in args.memory_layers.split(",")]
  b, s = args.memory_batch, args.memory_size
  hp = hyper(args, args.memory_steps, b, s)
  for name in args.models.split(","):
    net = load_net(name, splits["train"].num_classes, s, b, max(ks))
    t0 = time.perf_counter()
    batches = cached_batches(net, splits["train"], args.memory_steps, b, 0)
    log(f"{name}: features at {net.block} "
        f"{tuple(batches[0][0].shape)} in {time.perf_counter() - t0:.0f} s")
    images = jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((b,), jnp.int32)
    for k in ks:
      for label, settings in methods.items():
        cell = {"model": name, "k": k, "method": label,
                "pretrained": net.weights is not None}
        why = _supported(settings)
        if why:
          cells.append({**cell, "skipped": why})
          continue
        run = finetune(net, settings, k, 0, batches, hp, log)
        cell.update(summarise(run.rows))
        caps = run.capacities()
        tail = lv.measure.xla_memory(run.step_fn, run.state, run.frozen,
                                     jax.ShapeDtypeStruct(
                                         batches[0][0].shape, jnp.float32),
                                     labels, capacities=caps)
        whole_fn = train.make_train_step(net.model, run.plan, run.tx, 0, s)
        whole = lv.measure.xla_memory(whole_fn, run.state, run.frozen,
                                      images, labels, capacities=caps)
        cell.update({
            "xla_tail_temp_mib": tail.temp_bytes / MiB,
            "xla_whole_temp_mib": whole.temp_bytes / MiB,
            "xla_whole_peak_mib": whole.peak_bytes / MiB,
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


def _eval_set(net: Net, split, n: int):
  idx = np.arange(min(n, len(split)) if n > 0 else len(split))
  images, labels = split.get(idx, net.image_size)
  if net.tail is None:
    return images, jnp.asarray(labels)
  feats = featurizer(net)
  parts = [feats(images[i:i + 250]) for i in range(0, len(idx), 250)]
  return jnp.concatenate(parts), jnp.asarray(labels)


def part_accuracy(args, splits, save, log=print) -> dict:
  methods = selected_methods(args)
  b, s = args.batch_size, args.image_size
  hp = hyper(args, args.steps, b, s)
  net = load_net(args.accuracy_model, splits["train"].num_classes, s, b, 4)
  ks = [k.strip() for k in args.accuracy_layers.split(",")]
  runs = []
  eval_feats = _eval_set(net, splits["test"], args.eval_examples)
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
      why = _supported(settings)
      if why:
        runs.append({**cell, "skipped": why})
        continue
      t0 = time.perf_counter()
      if k_text == "all":
        if eval_images is None:
          idx = np.arange(min(args.eval_examples, len(splits["test"])))
          imgs, lbls = splits["test"].get(idx, s)
          eval_images = (imgs, jnp.asarray(lbls))
        if ("images", seed) not in batches:
          batches = {("images", seed): [
              (x, jnp.asarray(y)) for x, y in (
                  splits["train"].get(splits["train"].batch_indices(
                      i, b, seed), s) for i in range(args.steps))]}
        run = finetune(net, settings, k, seed, batches["images", seed], hp,
                       log)
        accuracy = evaluate(net, run, *eval_images)
      else:
        if ("features", seed) not in batches:
          batches = {("features", seed): cached_batches(
              net, splits["train"], args.steps, b, seed)}
        run = finetune(net, settings, k, seed, batches["features", seed], hp,
                       log)
        accuracy = evaluate(net, run, *eval_feats)
      cell.update(summarise(run.rows))
      cell.update({"accuracy": accuracy, "layers": k,
                   "wall_s": time.perf_counter() - t0,
                   "final_loss": run.rows[-1]["loss"]})
      if seed == 0 and k_text == "4" and settings["method"] == "hosvd":
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
  net = load_net("mobilenet_v2", splits["train"].num_classes, s, b, 4)
  feats, _ = cached_batches(net, splits["train"], 1, b, 0)[0]
  out = {}
  for eps in EPS_GRID:
    settings = {"method": "hosvd", "eps": eps, "rank_fraction": 1.0,
                "on_overflow": "ignore"}
    plan = lvr.make_plan(net.layers, lvr.fine_tune_last(
        net.layers, 4, settings, head=net.spec.head))

    @jax.jit
    def stats(v, x, plan=plan):
      with plan.intercept():
        _, st = net.tail.apply(v, x, train=True, mutable=["compression"],
                               rngs={"dropout": jax.random.key(0)})
      return lvf.collect_stats(st)

    st = stats(net.variables, feats)
    out[str(eps)] = {p: [int(r) for r in np.asarray(v.needed_ranks).ravel()]
                     for p, v in st.items()}
    log(f"  ε={eps}: {out[str(eps)]}")
  shapes = {p: list(net.layers[[l.path for l in net.layers].index(p)]
                    .input_shape) for p in out[str(EPS_GRID[0])]}
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
    args.dataset = data_lib.default_dataset()
  splits = None
  for part in PARTS:
    if part not in args.parts:
      continue
    t0 = time.perf_counter()
    print(f"== {part}")

    def save(result, part=part, t0=t0, partial=True):
      result.update(environment=environment(), partial=partial,
                    command="python experiments/paper_benchmarks.py " + part,
                    wall_s=time.perf_counter() - t0)
      with open(os.path.join(args.results, f"{part}.json"), "w") as f:
        json.dump(result, f, indent=1)

    if part == "speed":
      result = part_speed(args)
    else:
      if splits is None:
        splits = data_lib.load(args.dataset, args.data_dir)
      result = globals()[f"part_{part}"](args, splits, save)
    save(result, partial=False)
    print(f"== {part}: {result['wall_s']:.0f} s")
  if "page" in args.parts:
    benchmarks_page.write(args.results, args.page)
    print(f"wrote {args.page}")


if __name__ == "__main__":
  main()
