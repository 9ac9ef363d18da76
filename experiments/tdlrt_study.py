"""TDLRT against its baselines, with the reference training protocol, a
validation split, one learning-rate grid and many seeds.

``--task digits`` (default): the network and data of ``experiments/tdlrt.py``
(a four-layer CNN on scikit-learn's 8×8 digits; conv2 and conv3 factorized).
``--task fashion_mnist``: a five-layer VGG-style CNN
(:class:`lowrank_vjp.training.digits_net.SmallVGG`; conv2, conv3 and conv4
factorized) on Debian's Fashion-MNIST (``apt-get install
dataset-fashion-mnist``). What differs from ``experiments/tdlrt.py``:

* **Protocol.** TDLRT trains in cycles (:class:`lowrank_vjp.tdlrt.Cycle`):
  augment, ``--local-steps`` Galerkin steps in the fixed augmented basis,
  truncate; then ``--finetune-steps`` steps at fixed ranks. Every method
  trains with the same optimizer: AdamW on a cosine schedule over the whole
  run, gradients clipped to global norm 1
  (:func:`lowrank_vjp.training.tdlrt_study.optimizer`). TDLRT adapts the
  channel modes (the reference's default; ``--adaptive-modes all`` for
  every mode) with the reference's second-moment handling
  (``--second-moments zero``).
* **Selection.** Every fifth training image is held out for validation; each
  method's learning rate is the one of ``--lrs`` with the best mean
  validation accuracy over the seeds; test accuracy is reported at that
  rate only.
* **Baselines.** ``full`` (the plain network); ``tucker_oracle``: vanilla
  Tucker (core and factors trained directly) at the ranks TDLRT ended with in
  the same seed, an oracle no user has; ``tucker_uniform``: vanilla Tucker
  with one rank fraction for both layers at TDLRT's parameter count;
  ``matrix``: a matrix factorization ``[9·I, O]`` per layer at TDLRT's
  parameter count of that layer. The baselines use TDLRT's ranks at its
  selected learning rate.
* **Seeds.** ``--seeds`` initialisations and data orders; differences to
  TDLRT are paired by seed, with Student-t 95 % intervals.
* **Variants** (``--variants``): TDLRT with one setting changed (the
  default: our second-moment fill, and one Galerkin step per basis as in
  the paper's algorithm), at TDLRT's selected rate, paired by seed.
* **Robustness to the initialisation** (``--conditions``): TDLRT and vanilla
  Tucker (trained at TDLRT's capacity) from the same Tucker initialisation,
  either with an ill-conditioned core (``cond=…``: the core scaled along
  every mode by a geometric sequence from 1 to 1/ratio) or a small one
  (``scale=…``), each at its selected learning rate.

Writes ``runs.jsonl`` (one line per run, as it finishes), ``report.json``
and ``tdlrt_study.md`` into ``--workdir``.

Usage:
  python experiments/tdlrt_study.py --workdir /tmp/study
  python experiments/tdlrt_study.py --workdir /tmp/smoke --seeds 2 \
      --steps 6 --finetune-steps 2 --local-steps 2 --lrs 0.01 \
      --conditions cond=10 --variants local_steps=1
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see train.py

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lowrank_vjp import tdlrt as lt  # noqa: E402
from lowrank_vjp import training  # noqa: E402
from lowrank_vjp.training import digits_net as dn  # noqa: E402
from lowrank_vjp.training import factorized as fz  # noqa: E402
from lowrank_vjp.training import tdlrt_study as ts  # noqa: E402

TASKS = {
    # The network of experiments/tdlrt.py on scikit-learn's digits.
    "digits": dict(
        model=dn.Net(), factorized=dn.FACTORIZED, input=(1, 8, 8, 1),
        capacity={"conv2": (3, 3, 16, 32), "conv3": (3, 3, 32, 32)},
        load=lambda a: training.data.load_digits_split()),
    # A small VGG on (a subset of) Debian's Fashion-MNIST.
    "fashion_mnist": dict(
        model=dn.SmallVGG(), factorized=dn.VGG_FACTORIZED,
        input=(1, 28, 28, 1),
        capacity={"conv2": (3, 3, 16, 32), "conv3": (3, 3, 32, 32),
                  "conv4": (3, 3, 32, 64)},
        load=lambda a: training.data.load_fashion_mnist_arrays(
            a.train_examples, a.test_examples)),
}
PRNG = "rbg"  # as experiments/tdlrt.py: faster initialisation compiles
BASELINES = ("full", "tucker_oracle", "tucker_uniform", "matrix")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--task", choices=sorted(TASKS), default="digits")
  p.add_argument("--train-examples", type=int, default=None,
                 help="fashion_mnist: the first N training images (all "
                 "60,000 when unset), a fifth of them for validation")
  p.add_argument("--test-examples", type=int, default=None,
                 help="fashion_mnist: the first N test images")
  p.add_argument("--seeds", type=int, default=10)
  p.add_argument("--lrs", default="0.001,0.003,0.01",
                 help="the learning-rate grid of every method")
  p.add_argument("--steps", type=int, default=800,
                 help="TDLRT's rank-adaptive steps")
  p.add_argument("--finetune-steps", type=int, default=200,
                 help="TDLRT's fixed-rank steps; every other method trains "
                 "for --steps + --finetune-steps")
  p.add_argument("--local-steps", type=int, default=10)
  p.add_argument("--tau", type=float, default=0.2)
  p.add_argument("--min-rank", type=int, default=3)
  p.add_argument("--second-moments", choices=lt.SECOND_MOMENT_MODES,
                 default="zero")
  p.add_argument("--adaptive-modes", choices=("channels", "all"),
                 default="channels")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--weight-decay", type=float, default=1e-4)
  p.add_argument("--conditions", default="cond=1,cond=1000,scale=0.01",
                 help="initialisations of the robustness runs (cond=1 is "
                 "the unchanged one, their reference); '' for none")
  p.add_argument("--robustness-tucker-lr", type=float, default=None,
                 help="vanilla Tucker's rate in the robustness runs (default:"
                 " the oracle's selected rate, else TDLRT's)")
  p.add_argument("--baselines", default=",".join(BASELINES),
                 help="comma-separated subset of the baselines; '' for none")
  p.add_argument("--variants", default="second_moments=mean;local_steps=1",
                 help="';'-separated TDLRT variants run at TDLRT's selected "
                 "rate and compared by seed: key=value of TDLRTConfig "
                 "(second_moments, tau, align_bases, min_rank) or "
                 "local_steps; '' for none")
  return p.parse_args(argv)


class Study:
  """The data, the runs done so far, and how to do one more."""

  def __init__(self, args):
    self.args = args
    self.task = task = TASKS[args.task]
    self.model, self.factorized = task["model"], task["factorized"]
    self.capacity = task["capacity"]
    train, self.test = task["load"](args)
    self.train, self.val = ts.validation_split(*train)
    self.total = args.steps + args.finetune_steps
    self.config = lt.TDLRTConfig(
        tau=args.tau, min_rank=args.min_rank,
        second_moments=args.second_moments,
        adaptive_modes=None if args.adaptive_modes == "all" else (-2, -1))
    self.loss_fn = dn.make_loss(self.model)
    self.runs = []
    self.path = os.path.join(args.workdir, "runs.jsonl")
    open(self.path, "w").close()

  def _key(self, seed):
    return jax.random.key(seed, impl=PRNG)

  def base(self, seed):
    return jax.jit(self.model.init)(
        self._key(seed), jnp.zeros(self.task["input"]))["params"]

  def tucker(self, seed, ranks, factorization="tucker"):
    return fz.tuckerize(self.base(seed), jax.random.fold_in(
        self._key(seed), 1), self.factorized, ranks,
                        factorization=factorization)

  def accuracy(self, params, data):
    return dn.accuracy(params, data, model=self.model)

  def run(self, method, lr, seed, params, tdlrt=False, variant=None,
          **extra):
    a = self.args
    data = training.data.epoch_batches(*self.train, a.batch, seed)
    opt = ts.optimizer(lr, self.total, weight_decay=a.weight_decay)
    t = time.perf_counter()
    if tdlrt:
      config, local = self.config, a.local_steps
      if variant:
        changes = dict(variant)
        local = int(changes.pop("local_steps", local))
        config = dataclasses.replace(config, **changes)
      p = fz.train_tdlrt(self.loss_fn, params, opt, config, data,
                         self.total, lambda _: None, method,
                         cycle=lt.Cycle(a.steps, local, a.finetune_steps))
    else:
      p = fz.train_plain(self.loss_fn, params, opt, data, self.total,
                         lambda _: None, method)
    entry = {"method": method, "lr": lr, "seed": seed,
             "val_accuracy": self.accuracy(p, self.val),
             "test_accuracy": self.accuracy(p, self.test),
             "params_kept": fz.param_stats(p, self.factorized)["params_kept"],
             "ranks": fz.ranks_of(p, self.factorized),
             "wall_s": time.perf_counter() - t, **extra}
    self.runs.append(entry)
    with open(self.path, "a") as f:
      f.write(json.dumps(entry) + "\n")
    print(f"  {method:<16} lr {lr:<6g} seed {seed}: val "
          f"{entry['val_accuracy']:.4f} test {entry['test_accuracy']:.4f} "
          f"ranks {entry['ranks']} ({entry['wall_s']:.0f} s)", flush=True)
    return entry


def _variant(spec):
  """``"key=value"`` → ``(key, value)`` with the value's type."""
  key, _, value = spec.partition("=")
  kinds = {"second_moments": str, "tau": float, "min_rank": int,
           "local_steps": int,
           "align_bases": lambda v: {"true": True, "false": False}[v.lower()]}
  if key not in kinds or not value:
    raise ValueError(f"--variants: {spec!r} is not key=value with key one of "
                     f"{sorted(kinds)}.")
  return key, kinds[key](value)


def _condition(w, spec):
  kind, _, value = spec.partition("=")
  try:
    value = float(value)
  except ValueError:
    value = None
  if kind == "cond" and value is not None and value >= 1:
    return ts.condition_core(w, value)
  if kind == "scale" and value is not None and value > 0:
    return lt.TuckerWeight(w.core * value, w.factors, w.shape)
  raise ValueError(f"--conditions: {spec!r} is neither cond=R (R >= 1) nor "
                   "scale=S (S > 0).")


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  lrs = [float(v) for v in args.lrs.split(",")]
  conditions = [c for c in args.conditions.split(",") if c]
  baselines = [b for b in args.baselines.split(",") if b]
  variants = [v for v in args.variants.split(";") if v]
  # Bad values fail here, not after hours of training.
  for c in conditions:
    _condition(lt.random_tucker(jax.random.key(0), (2, 2), 1), c)
  unknown = set(baselines) - set(BASELINES)
  if unknown:
    raise ValueError(f"--baselines: {sorted(unknown)} not in {BASELINES}.")
  variants = {v: tuple(_variant(part) for part in v.split(","))
              for v in variants}
  for changes in variants.values():
    changes = dict(changes)
    lt.Cycle(1, changes.pop("local_steps", 1))
    lt.TDLRTConfig(**changes)
  # Runs of the same shapes and rate compile to the same program: reuse it.
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(args.workdir, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  study = Study(args)
  seeds = range(args.seeds)
  t0 = time.time()
  print(f"{args.task}: {len(study.train[0])} train / {len(study.val[0])} val / "
        f"{len(study.test[0])} test; {study.total} steps; lrs {lrs}; "
        f"{args.seeds} seeds", flush=True)
  tdlrt_runs = {}
  for lr in lrs:
    for s in seeds:
      if "full" in baselines:
        study.run("full", lr, s, study.base(s))
      tdlrt_runs[lr, s] = study.run("tdlrt", lr, s,
                                    study.tucker(s, study.capacity),
                                    tdlrt=True)
  lr_t = ts.select({lr: [tdlrt_runs[lr, s]["val_accuracy"] for s in seeds]
                    for lr in lrs})
  factorized = study.factorized
  shapes = {n: study.base(0)[n]["kernel"].shape for n in factorized}
  for s in seeds:
    ranks = {n: tuple(r) for n, r in tdlrt_runs[lr_t, s]["ranks"].items()}
    per_layer = {n: ts.tucker_params(shapes[n], ranks[n]) for n in factorized}
    uniform = ts.uniform_ranks(shapes, sum(per_layer.values()))
    matrix = {n: (fz.matrix_rank_for(shapes[n], per_layer[n]),) * 2
              for n in factorized}
    starts = {"tucker_oracle": (ranks, "tucker"),
              "tucker_uniform": (uniform, "tucker"),
              "matrix": (matrix, "matrix")}
    for lr in lrs:
      for b in baselines:
        if b in starts:
          study.run(b, lr, s, study.tucker(s, *starts[b]))
    for v, changes in variants.items():
      study.run(f"tdlrt[{v}]", lr_t, s, study.tucker(s, study.capacity),
                tdlrt=True, variant=changes)
  summary = ts.summarize(study.runs)
  robustness = {}
  for c in conditions:
    rows = []
    for s in seeds:
      w = study.tucker(s, study.capacity)
      for n in factorized:
        w[n]["kernel"] = _condition(w[n]["kernel"], c)
      rows.append(study.run(f"tdlrt@{c}", lr_t, s, w, tdlrt=True,
                            condition=c))
      lr_v = args.robustness_tucker_lr or summary.get(
          "tucker_oracle", summary["tdlrt"])["lr"]
      rows.append(study.run(f"tucker_capacity@{c}", lr_v, s, w,
                            condition=c))
    robustness[c] = rows
  env = training.environment()
  command = "python experiments/tdlrt_study.py " + shlex.join(
      sys.argv[1:] if argv is None else argv)
  report = {"environment": env, "command": command, "args": vars(args),
            "tdlrt_lr": lr_t, "summary": summary, "wall_s": time.time() - t0}
  text = ts.table(summary)
  for c, rows in robustness.items():
    by = {}
    for r in rows:
      by.setdefault(r["method"].split("@")[0], {})[r["seed"]] = r
    t, v = by["tdlrt"], by["tucker_capacity"]
    common = sorted(set(t) & set(v))
    d = ts.paired_interval([t[s]["test_accuracy"] for s in common],
                           [v[s]["test_accuracy"] for s in common])
    report.setdefault("robustness", {})[c] = {
        "tdlrt": [t[s]["test_accuracy"] for s in common],
        "tucker_capacity": [v[s]["test_accuracy"] for s in common],
        "tdlrt_minus_tucker": d}
  with open(os.path.join(args.workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  lines = [f"`{command}`: {env['device']} ({env['machine']}), jax "
           f"{env['jax']}, {env['date']}; {report['wall_s']:.0f} s.", "",
           text]
  if robustness:
    lines += ["", "| initialisation | TDLRT test % | vanilla Tucker "
              "(capacity) test % | TDLRT − Tucker, points (95 % CI) |",
              "|---|---|---|---|"]
    for c, e in report["robustness"].items():
      d = e["tdlrt_minus_tucker"]
      lines.append(
          f"| {c} | {100 * sum(e['tdlrt']) / len(e['tdlrt']):.2f} | "
          f"{100 * sum(e['tucker_capacity']) / len(e['tucker_capacity']):.2f}"
          f" | {100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, "
          f"{100 * d['high']:+.2f}] |")
  with open(os.path.join(args.workdir, "tdlrt_study.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n" + "\n".join(lines[2:]))
  return report


if __name__ == "__main__":
  main()
