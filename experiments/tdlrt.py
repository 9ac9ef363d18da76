"""TDLRT on scikit-learn's digits: accuracy against compression, and memory.

Trains one small CNN (conv 1→32, conv 32→64, pool, conv 64→64, mean, dense)
on scikit-learn's 8×8 handwritten digits (offline; every fifth image is in
the test set) in one run, same data order and seed for every method:

* ``full``: the plain network (Adam).
* ``tdlrt_tau=…``: conv2 and conv3 as Tucker kernels trained by TDLRT
  (Galerkin step with Adam), for several truncation tolerances τ.
* ``tucker_tau=…``: "vanilla Tucker", the same kernels with core and factors
  trained directly by Adam at the final ranks TDLRT found for that τ.
* ``matrix_tau=…``: a matrix factorization ``[9·I, O]`` of each kernel
  trained directly, at about the same parameter count.
* ``full+hosvd`` and ``tdlrt_tau=…+hosvd``: the same, with the inputs of
  conv2 and conv3 saved as HOSVD residuals for the backward pass
  (``lowrank_vjp.flax.conv_cls(method="hosvd")``, a wrapper of
  ``lv.compressed_conv``).
* adapters: a network pretrained on digits 0–4 is fine-tuned on 5–9 with a
  new head and conv2/conv3 frozen, corrected by a rank-adaptive Tucker adapter
  (TDLRT) or by a matrix LoRA of similar size; head-only and full fine-tuning
  for reference.

Writes ``report.json`` (one entry per method: accuracy, compression, memory),
``metrics.jsonl`` (training losses) and ``tdlrt.png`` into ``--workdir`` and
prints a table.

Usage:
  python experiments/tdlrt.py --workdir /tmp/tdlrt [--steps 1000]
  python experiments/tdlrt.py --workdir /tmp/smoke --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_vjp.flax as lvf
from lowrank_vjp import tdlrt as lt
from lowrank_vjp import training
from lowrank_vjp.training import digits_net as dn
from lowrank_vjp.training import factorized as fz

FACTORIZED = dn.FACTORIZED
BYTES = dn.BYTES
# XLA's RngBitGenerator compiles several times faster on the CPU than
# threefry; initialisation compiles are a large part of a short run.
PRNG = "rbg"


# ------------------------------------------------------------ the runs ---


def run_compression(args, train, test, log):
  results = {}
  key = jax.random.key(args.seed, impl=PRNG)
  base = jax.jit(dn.Net().init)(key, jnp.zeros((1, 8, 8, 1)))["params"]
  loss_fn = dn.make_loss(dn.Net())
  hosvd_model = dn.Net(conv_cls=lvf.conv_cls(
      **training.method_settings("hosvd", eps=args.eps)))
  hosvd_loss = dn.make_loss(hosvd_model)
  opt = optax.adam(args.lr)
  fopt = optax.adam(args.factorized_lr)
  probe = next(training.data.epoch_batches(*train, args.batch, 12345))

  def data():
    return training.data.epoch_batches(*train, args.batch, args.seed)

  def record(name, params, method, hosvd=None, extra=None):
    entry = {"accuracy": dn.accuracy(params, test), "method": method}
    entry["compression"] = fz.param_stats(params, FACTORIZED)
    entry["ranks"] = fz.ranks_of(params, FACTORIZED)
    entry["memory_bytes"] = {
        "params": entry["compression"]["params_kept"] * BYTES,
        "optimizer_state": fz.optimizer_state_params(params, method) * BYTES,
        "activations_conv2_conv3": dn.activation_bytes(params, probe, hosvd),
    }
    entry.update(extra or {})
    results[name] = entry
    c = entry["compression"]
    print(f"  {name:<22} acc {entry['accuracy']:.4f}  params kept "
          f"{c['params_kept_frac']:.3f}  ranks {entry['ranks']}", flush=True)

  t = time.time()
  p = fz.train_plain(loss_fn, base, opt, data(), args.steps, log, "full")
  record("full", p, "full")
  p = fz.train_plain(hosvd_loss, base, opt, data(), args.steps, log,
                     "full+hosvd")
  record("full+hosvd", p, "full", hosvd=args.eps)
  print(f"  (full runs {time.time() - t:.1f} s)", flush=True)

  cap = {"conv2": (3, 3, 16, 32), "conv3": (3, 3, 32, 32)}
  for tau in args.taus:
    t = time.time()
    config = lt.TDLRTConfig(tau=tau, adaptive_modes=args.modes)
    start = fz.tuckerize(base, jax.random.fold_in(key, 1), FACTORIZED, cap)
    p = fz.train_tdlrt(loss_fn, start, fopt, config, data(), args.steps, log,
                       f"tdlrt_tau={tau}")
    record(f"tdlrt_tau={tau}", p, "tdlrt", extra={"tau": tau})
    ranks = fz.ranks_of(p, FACTORIZED)
    # Vanilla Tucker: same final ranks, factors and core trained directly.
    start = fz.tuckerize(base, jax.random.fold_in(key, 1), FACTORIZED,
                         {n: tuple(ranks[n]) for n in FACTORIZED})
    q = fz.train_plain(loss_fn, start, fopt, data(), args.steps, log,
                       f"tucker_tau={tau}")
    record(f"tucker_tau={tau}", q, "tucker", extra={"tau": tau})
    # Matrix factorization at about the same parameter count per layer.
    mranks = {}
    for n in FACTORIZED:
      kept, _ = fz.layer_params(p[n]["kernel"])
      r = fz.matrix_rank_for(base[n]["kernel"].shape, kept)
      mranks[n] = (r, r)
    start = fz.tuckerize(base, jax.random.fold_in(key, 1), FACTORIZED,
                         mranks, factorization="matrix")
    q = fz.train_plain(loss_fn, start, fopt, data(), args.steps, log,
                       f"matrix_tau={tau}")
    record(f"matrix_tau={tau}", q, "matrix", extra={"tau": tau})
    print(f"  (τ={tau}: {time.time() - t:.1f} s)", flush=True)

  tau = args.hosvd_tau
  config = lt.TDLRTConfig(tau=tau, adaptive_modes=args.modes)
  start = fz.tuckerize(base, jax.random.fold_in(key, 1), FACTORIZED, cap)
  p = fz.train_tdlrt(hosvd_loss, start, fopt, config, data(), args.steps, log,
                     f"tdlrt_tau={tau}+hosvd")
  record(f"tdlrt_tau={tau}+hosvd", p, "tdlrt", hosvd=args.eps,
         extra={"tau": tau, "eps": args.eps})
  return results


def _subset(data, classes):
  x, y = data
  keep = np.isin(y, classes)
  return x[keep], (y[keep] - min(classes)).astype(np.int32)


def run_adapters(args, train, test, log):
  """Pretrain on 0–4, fine-tune on 5–9 with conv2/conv3 frozen + adapters."""
  results = {}
  key = jax.random.key(args.seed + 1, impl=PRNG)
  src_tr, dst_tr = _subset(train, range(5)), _subset(train, range(5, 10))
  dst_te = _subset(test, range(5, 10))
  model = dn.Net(classes=5)
  loss_fn = dn.make_loss(model)
  params = jax.jit(model.init)(key, jnp.zeros((1, 8, 8, 1)))["params"]
  source = training.data.epoch_batches(*src_tr, args.batch, args.seed)
  params = fz.train_plain(loss_fn, params, optax.adam(args.lr), source,
                          args.adapter_steps, log, "pretrain_0-4")
  new_head = jax.jit(model.init)(jax.random.fold_in(key, 7),
                                 jnp.zeros((1, 8, 8, 1)))["params"]["head"]
  params = {k: dict(v) for k, v in params.items()}
  params["head"] = dict(new_head)

  def optimizer(trainable, lr):
    return fz.freeze_except(trainable, optax.adam(lr))

  def data():
    return training.data.epoch_batches(*dst_tr, args.batch, args.seed)

  head = {("head", "kernel"), ("head", "bias")}
  steps = args.adapter_steps

  def entry(p, trainable_params):
    acc = dn.accuracy(p, dst_te, classes=5)
    return {"accuracy": acc, "trainable_params": int(trainable_params)}

  head_params = sum(int(np.size(params["head"][k])) for k in params["head"])
  p = fz.train_plain(loss_fn, params, optimizer(head, args.lr), data(),
                     steps, log, "adapter_head_only")
  results["head_only"] = entry(p, head_params)
  all_keys = {(layer, k) for layer in params for k in params[layer]}
  p = fz.train_plain(loss_fn, params, optimizer(all_keys, args.lr), data(),
                     steps, log, "adapter_full_finetune")
  results["full_finetune"] = entry(
      p, sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params)))

  # Rank-adaptive Tucker adapters on conv2 / conv3 (TDLRT).
  tparams = {k: dict(v) for k, v in params.items()}
  caps = {"conv2": (3, 3, 8, 8), "conv3": (3, 3, 8, 8)}
  for i, n in enumerate(FACTORIZED):
    tparams[n]["kernel"] = jax.jit(functools.partial(
        lt.tucker_adapter, ranks=caps[n]))(jax.random.fold_in(key, 10 + i),
                                           params[n]["kernel"])
  trainable = head | {(n, "kernel") for n in FACTORIZED}
  config = lt.TDLRTConfig(tau=args.adapter_tau, adaptive_modes=args.modes)
  fopt = optimizer(trainable, args.factorized_lr)
  p = fz.train_tdlrt(loss_fn, tparams, fopt, config, data(), steps, log,
                     "adapter_tucker_tdlrt")
  n_ad = 0
  ranks = {}
  for n in FACTORIZED:
    d = p[n]["kernel"].delta
    r = [int(v) for v in np.asarray(d.ranks())]
    ranks[n] = r
    n_ad += lt.param_count(d.modes, r)
  results["tucker_adapter_tdlrt"] = entry(p, n_ad + head_params)
  results["tucker_adapter_tdlrt"]["ranks"] = ranks
  results["tucker_adapter_tdlrt"]["adapter_params"] = n_ad

  # Matrix LoRA with about the same adapter parameter count.
  lparams = {k: dict(v) for k, v in params.items()}
  n_lora = 0
  lranks = {}
  for i, n in enumerate(FACTORIZED):
    shape = params[n]["kernel"].shape
    target = lt.param_count(p[n]["kernel"].delta.modes, ranks[n])
    r = max(1, round(target / (math.prod(shape[:-1]) + shape[-1])))
    lranks[n] = r
    lparams[n]["kernel"] = jax.jit(functools.partial(
        lt.lora_adapter, rank=r))(jax.random.fold_in(key, 20 + i),
                                  params[n]["kernel"])
    n_lora += lparams[n]["kernel"].num_params
  q = fz.train_plain(loss_fn, lparams, fopt, data(), steps, log, "adapter_lora")
  results["lora"] = entry(q, n_lora + head_params)
  results["lora"]["ranks"] = lranks
  results["lora"]["adapter_params"] = n_lora
  for k, v in results.items():
    print(f"  {k:<22} acc {v['accuracy']:.4f}  trainable "
          f"{v['trainable_params']}", flush=True)
  return results


# ----------------------------------------------------------------- output --


def print_table(results):
  print(f"\n{'method':<22} {'acc':>7} {'kept':>7} {'c.r.':>7} "
        f"{'params KiB':>10} {'opt KiB':>8} {'act KiB':>8}  ranks")
  for name, e in results.items():
    c, m = e["compression"], e["memory_bytes"]
    ranks = e["ranks"]
    print(f"{name:<22} {e['accuracy']:>7.4f} {c['params_kept_frac']:>7.3f} "
          f"{c['compression_rate']:>7.3f} {m['params'] / 1024:>10.1f} "
          f"{m['optimizer_state'] / 1024:>8.1f} "
          f"{m['activations_conv2_conv3'] / 1024:>8.1f}  {ranks}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--adapter-steps", type=int, default=None,
                      help="steps of each adapter run (default: --steps/2)")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=2e-3,
                      help="Adam learning rate of the full network")
  parser.add_argument("--factorized-lr", type=float, default=1e-2,
                      help="Adam learning rate of every factorized method "
                      "(TDLRT's Galerkin step, vanilla Tucker, matrix, "
                      "adapters)")
  parser.add_argument("--taus", type=float, nargs="+",
                      default=[0.1, 0.2, 0.3])
  parser.add_argument("--hosvd-tau", type=float, default=0.2)
  parser.add_argument("--eps", type=float, default=0.9,
                      help="HOSVD explained variance for the activations")
  parser.add_argument("--adapter-tau", type=float, default=0.2)
  parser.add_argument("--no-adapters", action="store_true")
  parser.add_argument("--adaptive-modes", choices=("all", "channels"),
                      default="all",
                      help="TDLRT adapts every kernel mode, or only the "
                      "two channel modes (spatial factors fixed, faster)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  args.modes = None if args.adaptive_modes == "all" else (-2, -1)
  if args.adapter_steps is None:
    args.adapter_steps = max(2, args.steps // 2)
  os.makedirs(args.workdir, exist_ok=True)
  t0 = time.time()
  train, test = training.data.load_digits_split()
  metrics_path = os.path.join(args.workdir, "metrics.jsonl")
  with training.MetricsWriter(metrics_path, "w") as writer:
    log = writer.write
    print(f"digits: {len(train[0])} train / {len(test[0])} test; "
          f"{args.steps} steps, batch {args.batch}", flush=True)
    results = run_compression(args, train, test, log)
    adapters = None if args.no_adapters else run_adapters(args, train, test,
                                                          log)
  wall = time.time() - t0
  print_table(results)
  report = {
      "dataset": "sklearn digits 8x8 (every 5th image is test)",
      "device": f"{jax.devices()[0].device_kind} ({platform.machine()})",
      "jax": jax.__version__,
      "args": vars(args),
      "methods": results,
      "adapters": adapters,
      "wall_s": wall,
  }
  report["plot"] = training.plots.plot_compression(
      results, os.path.join(args.workdir, "tdlrt.png"))
  with open(os.path.join(args.workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(f"\nwall time {wall:.1f} s; report in {args.workdir}/report.json")
  return report


if __name__ == "__main__":
  main(sys.argv[1:])
