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
        (3, 50, 1.0), (4, 100, 1.0), (4, 50, 1.0))
"""(rungs per octave, patience, headroom) replayed by default."""


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run_dir", help="a run's directory: metrics.jsonl and "
                                 "report.json with rank_control")
  p.add_argument("--grid", default=None,
                 help="';'-separated per_octave,patience,headroom settings "
                      "(default: a grid around train.py's defaults)")
  p.add_argument("--out", default=None, help="also write the rows as JSON")
  return p.parse_args(argv)


def _settings(text):
  if text is None:
    return GRID
  out = []
  for item in text.split(";"):
    octave, patience, headroom = item.split(",")
    out.append((int(octave), int(patience), float(headroom)))
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

  def run(name, octave, patience, headroom, probe):
    controller = lv.RankController(lv.RankLadder(per_octave=octave),
                                   patience=patience, headroom=headroom)
    r = rank_replay.replay(needs, shapes, initial, controller, probe=probe)
    rows.append({"setting": name, "per_octave": octave,
                 "patience": patience, "headroom": headroom, "probe": probe,
                 "residual_over_optimal": r.residual_over_optimal,
                 "compiles": r.compiles, "redone_calls": r.redone_calls})

  own = rc.get("controller", {"per_octave": 2, "patience": 100,
                              "headroom": 1.0})
  run("the run's own", own["per_octave"], own["patience"], own["headroom"],
      True)
  for octave, patience, headroom in _settings(args.grid):
    for probe in (False, True):
      run("replayed", octave, patience, headroom, probe)
  print(f"{args.run_dir}: {len(needs)} steps; the run's report: capacity / "
        f"eps-optimal {rc['residual_over_optimal']:.3f}, "
        f"{rc['compiles']} compiles, {rc['redone_steps']} redone steps")
  print("| setting | rungs / octave | patience | headroom | first step | "
        "capacity / ε-optimal | compiles | recomputed calls |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['setting']} | {r['per_octave']} | {r['patience']} | "
          f"{r['headroom']:g} | {'probe' if r['probe'] else 'applied'} | "
          f"{r['residual_over_optimal']:.3f} | {r['compiles']} | "
          f"{r['redone_calls']} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"run_dir": args.run_dir, "report": rc, "rows": rows}, f,
                indent=1)
  return rows


if __name__ == "__main__":
  main()
