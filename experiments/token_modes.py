"""Which compression pays on a transformer's token activations: the dense
layers' weight-gradient error against their residual bytes.

Loads the parameters a ``train.py --model gpt_small`` run ended with (its
``--run`` directory; without one, a freshly initialised GPT, which says
little), takes one training batch of the Python-sources corpus, and prints,
per setting of ``lowrank_vjp.training.lm_modes.settings_grid`` (HOSVD over
all modes or some, at several ε; the batch-mode SVD; 8/4-bit codes), the
relative error of every dense kernel's gradient against exact backprop and
the residual bytes at the ranks ε needed. It writes ``--out`` (JSON) too.

Usage:
  python experiments/train.py --model gpt_small --method vanilla \\
      --workdir /tmp/gpt --steps 300
  python experiments/token_modes.py --run /tmp/gpt
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402

from lowrank_vjp import models, training  # noqa: E402
from lowrank_vjp.training import lm_modes  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--run", default=None,
                 help="a train.py gpt_small run directory (its ckpt/ and "
                 "report.json); none: a fresh initialisation")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=None,
                 help="tokens per example (default: the run's, else 128)")
  p.add_argument("--batch-index", type=int, default=1000,
                 help="which training batch (train.py's order)")
  p.add_argument("--data-dir", default=None, help="tfds data directory")
  p.add_argument("--out", default="token_modes.json")
  p.add_argument("--settings", default=None,
                 help="labels of the grid to measure, separated by ';' "
                 "(the labels hold commas; default: all)")
  # Tests: a smaller fresh model.
  p.add_argument("--n-layer", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--n-embd", type=int, default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _params(args):
  """The run's final parameters (restored as saved), or a fresh init."""
  if args.run is None:
    return None, "fresh initialisation"
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(args.run,
                                                               "ckpt")))
  step = manager.latest_step()
  if step is None:
    raise SystemExit(f"{args.run}/ckpt holds no checkpoint")
  state = manager.restore(step, args=ocp.args.StandardRestore())
  return state["params"], f"{args.run} at step {step}"


def main(argv=None) -> dict:
  args = parse_args(argv)
  report = {}
  if args.run is not None:
    with open(os.path.join(args.run, "report.json")) as f:
      report = json.load(f)
  seq_len = args.seq_len or report.get("seq_len") or 128
  splits = training.text.load(args.data_dir, seq_len)
  train = splits["train"]
  tokens, targets = train.get(train.batch_indices(
      args.batch_index, args.batch_size, report.get("seed", 0)))
  kwargs = {k: v for k, v in (("n_layer", args.n_layer),
                              ("n_embd", args.n_embd),
                              ("n_head", 2 if args.n_embd else None))
            if v is not None}
  model = models.get_spec("gpt_small").build(
      num_classes=256, block_size=seq_len, attention="jax",
      norm_method=None, activation="jax", **kwargs)
  params, source = _params(args)
  if params is None:
    params = model.init(jax.random.key(0), tokens)["params"]
  grid = lm_modes.settings_grid()
  if args.settings:
    wanted = [s.strip() for s in args.settings.split(";") if s.strip()]
    unknown = [s for s in wanted if s not in grid]
    if unknown:
      raise SystemExit(f"--settings: unknown {unknown}; known: {list(grid)}")
    grid = {s: grid[s] for s in wanted}
  rows = lm_modes.gradient_errors(model, params, tokens, targets, grid)
  print(f"gpt_small ({source}), batch {args.batch_size} x {seq_len} tokens; "
        "dense kernels' gradient vs exact backprop:")
  print(f"{'setting':<30} {'median err':>10} {'max err':>8} {'cosine':>7} "
        f"{'residual / input':>16}  worst layer")
  for label, r in rows.items():
    print(f"{label:<30} {r['median_error']:>10.3f} {r['max_error']:>8.3f} "
          f"{r['median_cosine']:>7.3f} {r['residual_fraction']:>16.4f}  "
          f"{r['worst_layer']}")
  result = {"source": source, "batch": args.batch_size, "seq_len": seq_len,
            "environment": training.environment(), "rows": rows}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
