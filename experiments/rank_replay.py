"""What rank-controller settings would have held and compiled on a run.

Replays a rank-controlled train.py run's per-step needed ranks through
controllers with other settings (``lowrank_vjp.training.rank_replay``: exact,
because every applied update kept the ranks ε needed whatever the
capacity), and prints, per setting, the capacity held over the ε-optimal
residual (mean over steps), the compiles and the recomputed calls. The
first row replays the run's own settings and protocol: it must equal what
the run's report says.

Usage:
  python experiments/train.py --method hosvd --eps 0.8 --steps 300 \\
      --workdir /tmp/ref300
  python experiments/rank_replay.py /tmp/ref300        # one-method job
  python experiments/rank_replay.py workdir/hosvd      # a run of several
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import lowrank_vjp as lv
from lowrank_vjp.training import rank_replay

GRID = ((2, 100, 1.0), (2, 50, 1.0), (2, 25, 1.0), (3, 100, 1.0),
        (3, 50, 1.0), (4, 100, 1.0), (4, 50, 1.0), (4, 25, 1.0),
        (8, 50, 1.0),
        (2, 50, 1.0, 0, 12), (2, 50, 1.0, 50, 12), (2, 50, 1.0, 100, 12),
        (2, 25, 1.0, 50, 12), (4, 50, 1.0, 50, 12))
"""(rungs per octave, patience, headroom[, shrink_every, background_steps])
replayed by default (shrink_every 0: no reviews; background_steps 0: every
compile waited for; 12: background compiles that take 12 steps, about a
compile's 5.8 s over a step's 0.48 s in train.py's default job on 2 CPU
cores)."""


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run_dir", help="a run's directory: metrics.jsonl and "
                                 "report.json with rank_control")
  p.add_argument("--grid", default=None,
                 help="';'-separated per_octave,patience,headroom"
                      "[,shrink_every,background_steps] settings (default: "
                      "a grid around train.py's defaults)")
  p.add_argument("--out", default=None, help="also write the rows as JSON")
  return p.parse_args(argv)


def _settings(text):
  if text is None:
    return GRID
  out = []
  for item in text.split(";"):
    fields = item.split(",")
    if len(fields) not in (3, 5):
      sys.exit(f"--grid: {item!r} is not per_octave,patience,headroom"
               "[,shrink_every,background_steps]")
    out.append((int(fields[0]), int(fields[1]), float(fields[2]),
                *map(int, fields[3:])))
  return tuple(out)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  with open(os.path.join(args.run_dir, "report.json")) as f:
    report = json.load(f)
  rc = report.get("rank_control")
  if not rc or "layer_shapes" not in rc:
    sys.exit(f"{args.run_dir}/report.json has no rank_control layer shapes: "
             "replay a rank-controlled run of the current train.py.")
  with open(os.path.join(args.run_dir, "metrics.jsonl")) as f:
    needs = [json.loads(line)["ranks"] for line in f]
  shapes = {k: tuple(v) for k, v in rc["layer_shapes"].items()}
  initial = {k: tuple(v) for k, v in rc["initial_capacities"].items()}
  rows = []

  def run(name, octave, patience, headroom, probe, shrink_every=0,
          background_steps=0):
    controller = lv.RankController(lv.RankLadder(per_octave=octave),
                                   patience=patience, headroom=headroom,
                                   shrink_every=shrink_every or None)
    r = rank_replay.replay(needs, shapes, initial, controller, probe=probe,
                           background_steps=background_steps)
    rows.append({"setting": name, "per_octave": octave,
                 "patience": patience, "headroom": headroom, "probe": probe,
                 "shrink_every": shrink_every,
                 "background_steps": background_steps,
                 "residual_over_optimal": r.residual_over_optimal,
                 "compiles": r.compiles, "stalls": r.stalls,
                 "background": r.background, "fallbacks": r.fallbacks,
                 "redone_calls": r.redone_calls})

  own = {"per_octave": 2, "patience": 100, "headroom": 1.0,
         "shrink_every": 0, **rc.get("controller", {})}
  # A run's background compiles finish when they finish: its own row
  # replays it with every compile waited for, which it equals only then.
  run("the run's own" if not own.get("background_compile") else
      "the run's own, compiles waited for", own["per_octave"],
      own["patience"], own["headroom"], True, own["shrink_every"])
  for setting in _settings(args.grid):
    for probe in ((False, True) if len(setting) == 3 else (True,)):
      run("replayed", *setting[:3], probe, *setting[3:])
  print(f"{args.run_dir}: {len(needs)} steps; the run's report: capacity / "
        f"eps-optimal {rc['residual_over_optimal']:.3f}, "
        f"{rc['compiles']} compiles, {rc['redone_steps']} redone steps")
  print("| setting | rungs / octave | patience | headroom | shrink every | "
        "background compile (steps) | first step | capacity / ε-optimal | "
        "compiles | calls that waited for one | calls at a larger setting | "
        "recomputed calls |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['setting']} | {r['per_octave']} | {r['patience']} | "
          f"{r['headroom']:g} | {r['shrink_every'] or '-'} | "
          f"{r['background_steps'] or '-'} | "
          f"{'probe' if r['probe'] else 'applied'} | "
          f"{r['residual_over_optimal']:.3f} | {r['compiles']} | "
          f"{r['stalls']} | {r['fallbacks']} | {r['redone_calls']} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"run_dir": args.run_dir, "report": rc, "rows": rows}, f,
                indent=1)
  return rows


if __name__ == "__main__":
  main()
