"""Whole-step peak memory and the largest batch that fits, per method.

One command for the tables of docs/benchmarks/peak_memory.md: XLA's
estimated peak of each method's compiled training step
(``lowrank_vjp.training.peak_memory``), the largest batch under a budget
(``lv.measure.max_batch``, compile-only), and a plot of peak against batch.

Usage:
  python experiments/peak_memory.py                 # the published setting
  python experiments/peak_memory.py --quick         # a smoke run (tests)
  python experiments/peak_memory.py --resume        # finish a stopped run
  python experiments/peak_memory.py --no-cnn --ks "" --bn-ks all \
      --max-batch-models resnet18 --out docs/benchmarks/train_bn
                                    # BatchNorm in training mode
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from lowrank_vjp.training import peak_memory as pm
from lowrank_vjp.training import report as report_lib

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs",
                    "benchmarks")


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--methods", default=",".join(list(pm.METHODS)))
  p.add_argument("--cnn-batch", type=int, default=64)
  p.add_argument("--cnn-size", type=int, default=96)
  p.add_argument("--models", default="resnet18,mobilenet_v2",
                 help="models of lowrank_vjp.models measured at --size")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--ks", default="all,4",
                 help="trained layers of the models, BatchNorm frozen")
  p.add_argument("--bn-ks", default="",
                 help="trained layers of the models, BatchNorm in training "
                 "mode (compressing methods keep 8-bit codes of its x̂)")
  p.add_argument("--no-cnn", action="store_true",
                 help="skip the ResidualCNN tables and the batch curve")
  p.add_argument("--max-batch-models", default=None,
                 help="models (of --models) that also get the largest-batch "
                 "search (default: all of them; MobileNetV2's compiles are "
                 "slow on a CPU)")
  p.add_argument("--budget-mib", type=float, default=2048)
  p.add_argument("--cnn-budget-mib", type=float, default=512)
  p.add_argument("--tolerance", type=float, default=0.1)
  p.add_argument("--curve-batches", default="16,32,64,128")
  p.add_argument("--out", default=DOCS)
  p.add_argument("--quick", action="store_true",
                 help="tiny sizes, two methods (a smoke run)")
  p.add_argument("--resume", action="store_true",
                 help="keep the tables of --out's peak_memory.json and "
                 "measure only those it lacks (a run that stopped part-way); "
                 "the page names both commands")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse(argv)
  if args.quick:
    args.methods, args.models, args.ks = "vanilla,hosvd", "resnet18", "4"
    args.cnn_batch, args.cnn_size, args.size, args.batch = 4, 16, 32, 2
    args.budget_mib, args.cnn_budget_mib = 160, 8
    args.curve_batches = "2,4"
  t0 = time.perf_counter()
  names = [m.strip() for m in args.methods.split(",") if m.strip()]
  cnn = pm.Setting("cnn", "all", args.cnn_size)
  cnn_names = names + [pm.REMAT]
  command = ("python experiments/peak_memory.py " + shlex.join(
      argv if argv is not None else sys.argv[1:])).strip()
  result = {"environment": report_lib.environment(), "command": command,
            "peaks": [], "max_batch": []}
  earlier_s = 0.0
  path = os.path.join(args.out, "peak_memory.json")
  if args.resume and os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
    earlier_s = result.get("wall_s", 0.0)
    result.setdefault("resumed", []).append(
        {"command": command, "environment": report_lib.environment()})

  def log(msg):
    print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

  def done(kind, label, **match):
    return next((t for t in result[kind] if t["setting"] == label and all(
        t.get(k) == v for k, v in match.items())), None)

  def save(partial=True):
    result["wall_s"] = earlier_s + time.perf_counter() - t0
    result["partial"] = partial
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peak_memory.json"), "w") as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "peak_memory.md"), "w") as f:
      f.write(pm.page(result))

  searched = (args.models if args.max_batch_models is None
              else args.max_batch_models).split(",")
  models = [m for m in args.models.split(",") if m]
  settings = ([] if args.no_cnn else
              [(cnn, cnn_names, args.cnn_batch, args.cnn_budget_mib)]) + [
      (pm.Setting(m, k, args.size, train_bn=bn), names, args.batch,
       args.budget_mib)
      for m in models
      for ks, bn in ((args.ks, False), (args.bn_ks, True))
      for k in ks.split(",") if k]
  if not args.no_cnn and "curve" not in result:
    batches = [int(b) for b in args.curve_batches.split(",")]
    result["curve"] = {"setting": cnn.label(), "batches": batches,
                       "peak_bytes": {n: {str(b): pm.peak_bytes(cnn, n, b)
                                          for b in batches}
                                      for n in cnn_names}}
    os.makedirs(args.out, exist_ok=True)
    pm.plot(result["curve"], os.path.join(args.out, "peak_vs_batch.png"))
    log("peak against batch: done")
  for setting, these, batch, budget in settings:
    if done("peaks", setting.label(), batch=batch) is None:
      peaks = {n: pm.peak_bytes(setting, n, batch) for n in these}
      log(f"{setting.label()} batch {batch}: " + ", ".join(
          f"{n} {p / pm.MiB:.0f}" for n, p in peaks.items()))
      result["peaks"].append({"setting": setting.label(), "batch": batch,
                              "peak_bytes": peaks})
      save()
    if setting.model != "cnn" and setting.model not in searched:
      continue
    if done("max_batch", setting.label(),
            budget_bytes=int(budget * pm.MiB)) is not None:
      continue
    found = pm.max_batches(setting, these, int(budget * pm.MiB),
                           start=max(1, batch // 4),
                           tolerance=args.tolerance)
    log(f"{setting.label()} under {budget:.0f} MiB: " + ", ".join(
        f"{n} {f.batch}" for n, f in found.items()))
    result["max_batch"].append({
        "setting": setting.label(), "budget_bytes": int(budget * pm.MiB),
        "tolerance": args.tolerance,
        "batch": {n: f.batch for n, f in found.items()},
        "peak_bytes": {n: f.peak_bytes for n, f in found.items()},
        "compiles": {n: len(f.tried) for n, f in found.items()}})
    save()
  save(partial=False)
  log(f"wrote {args.out}/peak_memory.{{json,md}}"
      + ("" if args.no_cnn else " and peak_vs_batch.png"))
  return result


if __name__ == "__main__":
  main()
