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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf
from lowrank_vjp import tdlrt as lt

FACTORIZED = ("conv2", "conv3")
BYTES = 4  # float32
# XLA's RngBitGenerator compiles several times faster on the CPU than
# threefry; initialisation compiles are a large part of a short run.
PRNG = "rbg"


# ------------------------------------------------------------------ data --


def load_digits_split():
  """Digits as ``[N, 8, 8, 1]`` float32 (standardised) and int labels."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  x = (d.images.astype(np.float32) / 16.0)[..., None]
  y = d.target.astype(np.int32)
  test = np.arange(len(x)) % 5 == 0
  mean, std = x[~test].mean(), x[~test].std()
  x = (x - mean) / std
  return (x[~test], y[~test]), (x[test], y[test])


def batches(x, y, batch, seed):
  """Endless shuffled batches (epoch by epoch), deterministic by seed."""
  rng = np.random.RandomState(seed)
  while True:
    perm = rng.permutation(len(x))
    for i in range(0, len(x) - batch + 1, batch):
      j = perm[i:i + batch]
      yield jnp.asarray(x[j]), jnp.asarray(y[j])


# ----------------------------------------------------------------- model --


class Net(nn.Module):
  """conv(32) → conv(64) → avg-pool 2 → conv(64) → mean → dense(classes)."""

  classes: int = 10
  conv_cls: object = None   # conv_general_dilated_cls for conv2 / conv3

  @nn.compact
  def __call__(self, x):
    kw = {} if self.conv_cls is None else {
        "conv_general_dilated_cls": self.conv_cls}
    x = lv.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = lv.relu(nn.Conv(64, (3, 3), name="conv2", **kw)(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = lv.relu(nn.Conv(64, (3, 3), name="conv3", **kw)(x))
    return nn.Dense(self.classes, name="head")(x.mean((1, 2)))


def make_loss(model):
  def loss_fn(params, batch):
    x, y = batch
    logits = model.apply({"params": lt.materialize(params)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss_fn


@functools.cache
def _eval_fn(classes):
  model = Net(classes)
  return jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1))


def accuracy(params, data, classes=10):
  x, y = data
  pred = _eval_fn(classes)(lt.materialize(params), jnp.asarray(x))
  return float(np.mean(np.asarray(pred) == y))


# ------------------------------------------------------------- counting --


def _layer_params(leaf):
  """(kept params, full params) of one kernel leaf."""
  if isinstance(leaf, lt.TuckerWeight):
    r = [int(v) for v in np.asarray(leaf.ranks())]
    return lt.param_count(leaf.modes, r), math.prod(leaf.shape)
  return int(np.size(leaf)), int(np.size(leaf))


def param_stats(params):
  """Parameters kept by the factorized layers and by the whole network."""
  kept_f = full_f = kept = full = 0
  for name, layer in params.items():
    for key, leaf in layer.items():
      k, f = _layer_params(leaf)
      kept += k
      full += f
      if name in FACTORIZED and key == "kernel":
        kept_f += k
        full_f += f
  return {"params_kept": kept, "params_full": full,
          "params_kept_frac": kept / full,
          "compression_rate": 1.0 - kept / full,
          "factorized_kept_frac": kept_f / full_f}


def ranks_of(params):
  return {n: [int(v) for v in np.asarray(params[n]["kernel"].ranks())]
          for n in FACTORIZED if isinstance(params[n]["kernel"],
                                            lt.TuckerWeight)}


def optimizer_state_params(params, method):
  """Entries of Adam state (mu + nu) for the parameters a method trains.

  TDLRT keeps Adam state only for the cores (``Π r_i``) and the other
  parameters; the factors are updated by the basis step without state.
  """
  total = 0
  for layer in params.values():
    for leaf in layer.values():
      if isinstance(leaf, lt.TuckerWeight):
        r = [int(v) for v in np.asarray(leaf.ranks())]
        total += math.prod(r) if method == "tdlrt" else lt.param_count(
            leaf.modes, r)
      else:
        total += int(np.size(leaf))
  return 2 * total


def activation_bytes(params, batch, hosvd_eps):
  """Bytes saved for the backward pass of conv2 and conv3 (their inputs)."""
  x = batch[0]
  if hosvd_eps is None:
    n = x.shape[0]
    return n * (8 * 8 * 32 + 4 * 4 * 64) * BYTES
  model = Net(conv_cls=lvf.conv_cls(method="hosvd", eps=hosvd_eps,
                                    on_overflow="ignore"))
  _, state = jax.jit(lambda p, x: model.apply(
      {"params": lt.materialize(p)}, x, mutable=["compression"]))(params, x)
  stats = lvf.collect_stats(state)
  return int(sum(s.residual_nbytes for s in stats.values()))


# ------------------------------------------------------------- training --


class NonFiniteLoss(FloatingPointError):
  pass


def _check(loss, step):
  if not np.isfinite(loss):
    raise NonFiniteLoss(f"loss is {loss} at step {step}")


def train_plain(loss_fn, params, opt, data_iter, steps, log, name):
  """Direct training of whatever ``params`` holds (arrays, Tucker, LoRA)."""
  params = jax.tree_util.tree_map(jnp.copy, params)   # the step donates it
  state = (params, opt.init(params))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

  for i in range(steps):
    state, m = train_step(state, next(data_iter))
    if i % 50 == 0 or i == steps - 1:
      loss = float(m["loss"])
      _check(loss, i)
      log(dict(method=name, step=i, loss=loss))
  return state[0]


def train_tdlrt(loss_fn, params, opt, config, data_iter, steps, log, name):
  state = lt.init(opt, jax.tree_util.tree_map(jnp.copy, params))
  train_step = jax.jit(functools.partial(lt.step, loss_fn, opt, config),
                       donate_argnums=0)
  for i in range(steps):
    state, m = train_step(state, next(data_iter))
    if i % 50 == 0 or i == steps - 1:
      loss = float(m["loss"])
      _check(loss, i)
      ranks = {k: [int(v) for v in np.asarray(d["ranks"])]
               for k, d in m["layers"].items()}
      log(dict(method=name, step=i, loss=loss, ranks=ranks))
  return state.params


def tuckerize(params, key, ranks, init_ranks=None, factorization="tucker"):
  """conv2 / conv3 kernels replaced by random Tucker kernels."""
  params = {k: dict(v) for k, v in params.items()}

  def make(key):  # jitted once for both layers: one compile, not many ops
    out = {}
    for i, name in enumerate(FACTORIZED):
      pick = lambda x, n=name: x[n] if isinstance(x, dict) else x
      out[name] = lt.random_tucker(
          jax.random.fold_in(key, i), params[name]["kernel"].shape,
          pick(ranks), init_ranks=pick(init_ranks),
          factorization=factorization)
    return out

  for name, w in jax.jit(make)(key).items():
    params[name]["kernel"] = w
  return params


def matrix_rank_for(shape, target_params):
  """Rank of a ``[Π shape[:-1], O]`` factorization with about that count."""
  m, o = math.prod(shape[:-1]), shape[-1]
  # r² + r (m + o) = target
  r = (-(m + o) + math.sqrt((m + o) ** 2 + 4 * target_params)) / 2
  return max(1, min(round(r), min(m, o)))


# ------------------------------------------------------------ the runs ---


def run_compression(args, train, test, log):
  results = {}
  key = jax.random.key(args.seed, impl=PRNG)
  base = jax.jit(Net().init)(key, jnp.zeros((1, 8, 8, 1)))["params"]
  loss_fn = make_loss(Net())
  hosvd_model = Net(conv_cls=lvf.conv_cls(method="hosvd", eps=args.eps,
                                          on_overflow="ignore"))
  hosvd_loss = make_loss(hosvd_model)
  opt = optax.adam(args.lr)
  fopt = optax.adam(args.factorized_lr)
  probe = next(batches(*train, args.batch, 12345))

  def data():
    return batches(*train, args.batch, args.seed)

  def record(name, params, method, hosvd=None, extra=None):
    entry = {"accuracy": accuracy(params, test), "method": method}
    entry["compression"] = param_stats(params)
    entry["ranks"] = ranks_of(params)
    entry["memory_bytes"] = {
        "params": entry["compression"]["params_kept"] * BYTES,
        "optimizer_state": optimizer_state_params(params, method) * BYTES,
        "activations_conv2_conv3": activation_bytes(params, probe, hosvd),
    }
    entry.update(extra or {})
    results[name] = entry
    c = entry["compression"]
    print(f"  {name:<22} acc {entry['accuracy']:.4f}  params kept "
          f"{c['params_kept_frac']:.3f}  ranks {entry['ranks']}", flush=True)

  t = time.time()
  p = train_plain(loss_fn, base, opt, data(), args.steps, log, "full")
  record("full", p, "full")
  p = train_plain(hosvd_loss, base, opt, data(), args.steps, log,
                  "full+hosvd")
  record("full+hosvd", p, "full", hosvd=args.eps)
  print(f"  (full runs {time.time() - t:.1f} s)", flush=True)

  cap = {"conv2": (3, 3, 16, 32), "conv3": (3, 3, 32, 32)}
  for tau in args.taus:
    t = time.time()
    config = lt.TDLRTConfig(tau=tau, adaptive_modes=args.modes)
    start = tuckerize(base, jax.random.fold_in(key, 1), cap)
    p = train_tdlrt(loss_fn, start, fopt, config, data(), args.steps, log,
                    f"tdlrt_tau={tau}")
    record(f"tdlrt_tau={tau}", p, "tdlrt", extra={"tau": tau})
    ranks = ranks_of(p)
    # Vanilla Tucker: same final ranks, factors and core trained directly.
    start = tuckerize(base, jax.random.fold_in(key, 1),
                      {n: tuple(ranks[n]) for n in FACTORIZED})
    q = train_plain(loss_fn, start, fopt, data(), args.steps, log,
                    f"tucker_tau={tau}")
    record(f"tucker_tau={tau}", q, "tucker", extra={"tau": tau})
    # Matrix factorization at about the same parameter count per layer.
    mranks = {}
    for n in FACTORIZED:
      kept, _ = _layer_params(p[n]["kernel"])
      r = matrix_rank_for(base[n]["kernel"].shape, kept)
      mranks[n] = (r, r)
    start = tuckerize(base, jax.random.fold_in(key, 1), mranks,
                      factorization="matrix")
    q = train_plain(loss_fn, start, fopt, data(), args.steps, log,
                    f"matrix_tau={tau}")
    record(f"matrix_tau={tau}", q, "matrix", extra={"tau": tau})
    print(f"  (τ={tau}: {time.time() - t:.1f} s)", flush=True)

  tau = args.hosvd_tau
  config = lt.TDLRTConfig(tau=tau, adaptive_modes=args.modes)
  start = tuckerize(base, jax.random.fold_in(key, 1), cap)
  p = train_tdlrt(hosvd_loss, start, fopt, config, data(), args.steps, log,
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
  model = Net(classes=5)
  loss_fn = make_loss(model)
  params = jax.jit(model.init)(key, jnp.zeros((1, 8, 8, 1)))["params"]
  params = train_plain(loss_fn, params, optax.adam(args.lr),
                       batches(*src_tr, args.batch, args.seed),
                       args.adapter_steps, log, "pretrain_0-4")
  new_head = jax.jit(model.init)(jax.random.fold_in(key, 7),
                                 jnp.zeros((1, 8, 8, 1)))["params"]["head"]
  params = {k: dict(v) for k, v in params.items()}
  params["head"] = dict(new_head)

  def label_fn(trainable):
    def labels(tree):
      return {layer: {k: ("train" if (layer, k) in trainable else "freeze")
                      for k in leaves} for layer, leaves in tree.items()}
    return labels

  def optimizer(trainable, lr):
    return optax.multi_transform(
        {"train": optax.adam(lr), "freeze": optax.set_to_zero()},
        label_fn(trainable))

  def data():
    return batches(*dst_tr, args.batch, args.seed)

  head = {("head", "kernel"), ("head", "bias")}
  steps = args.adapter_steps

  def entry(p, trainable_params):
    acc = accuracy(p, dst_te, classes=5)
    return {"accuracy": acc, "trainable_params": int(trainable_params)}

  head_params = sum(int(np.size(params["head"][k])) for k in params["head"])
  p = train_plain(loss_fn, params, optimizer(head, args.lr), data(), steps, log,
                  "adapter_head_only")
  results["head_only"] = entry(p, head_params)
  all_keys = {(layer, k) for layer in params for k in params[layer]}
  p = train_plain(loss_fn, params, optimizer(all_keys, args.lr), data(),
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
  p = train_tdlrt(loss_fn, tparams, fopt, config, data(), steps, log,
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
  q = train_plain(loss_fn, lparams, fopt, data(), steps, log, "adapter_lora")
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


def plot(results, path):
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("matplotlib not installed: no plot (pip install matplotlib)")
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  styles = {"tdlrt": "o-", "tucker": "s--", "matrix": "^:"}
  for method, style in styles.items():
    pts = sorted((e["compression"]["compression_rate"], e["accuracy"])
                 for k, e in results.items()
                 if e["method"] == method and "+hosvd" not in k)
    if pts:
      ax.plot(*zip(*pts, strict=False), style, label={"tdlrt": "TDLRT",
                                        "tucker": "vanilla Tucker",
                                        "matrix": "matrix factorization"}[
                                            method])
  for k, e in results.items():
    if "+hosvd" in k or k == "full":
      ax.plot(e["compression"]["compression_rate"], e["accuracy"],
              "k*" if k == "full" else "rx", label=k)
  ax.set_xlabel("compression rate (1 − parameters kept / full)")
  ax.set_ylabel("test accuracy (digits)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


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
  train, test = load_digits_split()
  metrics_path = os.path.join(args.workdir, "metrics.jsonl")
  with open(metrics_path, "w") as mf:
    def log(row):
      mf.write(json.dumps(row) + "\n")
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
  report["plot"] = plot(results, os.path.join(args.workdir, "tdlrt.png"))
  with open(os.path.join(args.workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(f"\nwall time {wall:.1f} s; report in {args.workdir}/report.json")
  return report


if __name__ == "__main__":
  main(sys.argv[1:])
