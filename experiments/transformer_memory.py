"""Whole-step peak and largest batch of a GPT-style model, per configuration.

Writes docs/benchmarks/transformer_memory.{json,md} from
``lowrank_vjp.training.lm_memory`` (compile-only: nothing is run).

Usage:
  python experiments/transformer_memory.py
  python experiments/transformer_memory.py --quick      # a smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from lowrank_vjp import measure
from lowrank_vjp.training import lm_memory
from lowrank_vjp.training import report as report_lib

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs",
                    "benchmarks")


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", default=";".join(lm_memory.ROWS),
                 help="rows of lowrank_vjp.training.lm_memory.ROWS, "
                 "separated by ';'")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--n-layer", type=int, default=4)
  p.add_argument("--n-head", type=int, default=4)
  p.add_argument("--n-embd", type=int, default=256)
  p.add_argument("--vocab", type=int, default=256)
  p.add_argument("--budget-mib", type=float, default=1024,
                 help="largest-batch search budget (0: no search)")
  p.add_argument("--max-batch-rows", default="vanilla;checkpoint (per "
                 "block);+ lv.flax.LayerNorm codes;lean + q/k/v codes",
                 help="rows that also get the largest-batch search (';')")
  p.add_argument("--out", default=DOCS)
  p.add_argument("--quick", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse(argv)
  if args.quick:
    args.rows = "vanilla;+ lv.flax.LayerNorm codes"
    args.batch, args.seq, args.n_layer, args.n_embd = 2, 16, 1, 32
    args.vocab, args.budget_mib = 32, 0   # no search: compiles are slow
  t0 = time.perf_counter()
  names = [r for r in args.rows.split(";") if r]
  sizes = dict(seq=args.seq, n_layer=args.n_layer, n_head=args.n_head,
               n_embd=args.n_embd, vocab=args.vocab)
  result = {"environment": report_lib.environment(),
            "command": ("python experiments/transformer_memory.py "
                        + shlex.join(argv if argv is not None
                                     else sys.argv[1:])).strip(),
            "sizes": sizes, "peaks": [], "max_batch": []}
  peaks = {}
  for name in names:
    peaks[name] = lm_memory.peak_bytes(lm_memory.ROWS[name], args.batch,
                                       **sizes)
    print(f"[{time.perf_counter() - t0:5.0f} s] {name}: "
          f"{peaks[name] / lm_memory.MiB:.1f} MiB", flush=True)
  result["peaks"].append({"batch": args.batch, "peak_bytes": peaks})
  if args.budget_mib > 0:
    found = {}
    for name in [r for r in args.max_batch_rows.split(";") if r in names]:
      found[name] = measure.max_batch(
          lambda b, n=name: lm_memory.make_step(lm_memory.ROWS[n], b,
                                                **sizes),
          int(args.budget_mib * lm_memory.MiB), start=args.batch,
          tolerance=0.1)
      print(f"[{time.perf_counter() - t0:5.0f} s] {name}: batch "
            f"{found[name].batch}", flush=True)
    result["max_batch"].append({
        "budget_bytes": int(args.budget_mib * lm_memory.MiB),
        "batch": {n: f.batch for n, f in found.items()},
        "peak_bytes": {n: f.peak_bytes for n, f in found.items()}})
  result["wall_s"] = time.perf_counter() - t0
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "transformer_memory.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, "transformer_memory.md"), "w") as f:
    f.write(lm_memory.page(result))
  return result


if __name__ == "__main__":
  main()
