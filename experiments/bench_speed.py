"""Step time of compressed vs vanilla training, side by side in one run.

Two sections, each printing every method's ratio to vanilla:

* ``layers``: the last four convolutions of MobileNetV2 at 224×224
  (torchvision's layout: features.17's 1×1 expansion 160→960, 3×3 depthwise
  960, 1×1 projection 960→320, and features.18's 1×1 320→1280, all at 7×7),
  batch 64 as in the HOSVD paper, each followed by ``lv.relu6``. For every
  method it times, under ``jax.jit``, the forward pass with its residuals
  kept (``jax.vjp``'s closure is returned, so the compression is in it), the
  training step (loss and weight gradients) and their difference (the
  backward pass). Weights and inputs are random.
* ``step``: a whole fine-tuning train step of MobileNetV2 at 224×224, batch
  64, 10 classes, random initialisation: the last four convolutions (and the
  classifier) trained through ``lowrank_vjp.rules``, the rest frozen, SGD —
  train.py's own ``make_train_step`` and ``make_optimizer``
  (``lowrank_vjp.training``), jitted with the state donated. hosvd/svd run
  at their default capacity (train.py's ``--rank-control off``); ASI at its
  default ranks (a quarter of each axis), its factors carried from step to
  step.

At a fixed capacity the work does not depend on ε (ε only masks
components), so the ε rows differ only by noise — both are printed to show
it. Each time is the median of ``--repeats`` calls after two warm-up calls
(the first compiles; for ASI the first is the cold, exact-HOSVD step).

Usage:
  python experiments/bench_speed.py [--batch 64] [--repeats 10] [--json F]
  python experiments/bench_speed.py --only step --step-batch 4 \
      --step-size 64 --repeats 1            # a quick check
  python experiments/bench_speed.py --only layers --contend 2 \
      [--lapack-threads openblas]           # a second job on the cores

``--contend N`` runs N spinning processes beside the timing; with
``--lapack-threads openblas`` the decompositions' LAPACK keeps OpenBLAS's
own thread count instead of the library's one thread
(``lv.set_cpu_lapack_threads``). Run it without ``OPENBLAS_NUM_THREADS``
in the environment, or that setting wins.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lowrank_vjp as lv
import lowrank_vjp.rules as lvr
from lowrank_vjp import models, training

DN = ("NHWC", "HWIO", "NHWC")
# (in channels, out channels, kernel, groups) of the last four convs.
LAYERS = ((160, 960, 1, 1), (960, 960, 3, 960), (960, 320, 1, 1),
          (320, 1280, 1, 1))


def make_weights(key):
  ws = []
  for i, (cin, cout, k, groups) in enumerate(LAYERS):
    std = (2.0 / (k * k * cin / groups)) ** 0.5
    ws.append(std * jax.random.normal(jax.random.fold_in(key, i),
                                      (k, k, cin // groups, cout)))
  return ws


def make_loss(method, eps):
  settings = training.method_settings(method, eps=eps)
  stateful = training.carries_state(settings)
  conv = (lax.conv_general_dilated if training.is_vanilla(method)
          else lv.compressed_conv(**settings))

  def loss(ws, x, states=None):
    new_states = []
    for i, (w, (_, _, k, groups)) in enumerate(zip(ws, LAYERS, strict=True)):
      pad = "SAME" if k > 1 else "VALID"
      if stateful:
        x, _, s = conv.with_state(x, w, (1, 1), pad, dimension_numbers=DN,
                                  feature_group_count=groups, state=states[i])
        new_states.append(s)
      else:
        x = conv(x, w, (1, 1), pad, dimension_numbers=DN,
                 feature_group_count=groups)
      x = lv.relu6(x)
    return jnp.mean(jnp.square(x)), new_states

  return loss


def init_states(method, x, ws):
  """The initial state of each layer of a stateful method (ASI), or None."""
  settings = training.method_settings(method)
  if not training.carries_state(settings):
    return None
  conv = lv.compressed_conv(**settings)
  states = []
  for w, (_, _, k, groups) in zip(ws, LAYERS, strict=True):
    pad = "SAME" if k > 1 else "VALID"
    states.append(conv.init_state(x, w, (1, 1), pad, dimension_numbers=DN,
                                  feature_group_count=groups))
    x = lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=DN,
                                 feature_group_count=groups)
  return states


def time_fn(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


CASES = [("vanilla", None)] + [(m, e) for m in ("hosvd", "svd")
                               for e in (0.8, 0.9)] + [("asi", None)]
"""``(method, eps)`` rows of both sections; ASI's ranks are fixed (no ε)."""


def bench_layers(args) -> dict:
  """The ``layers`` section: forward, backward and step of four convs."""
  key = jax.random.PRNGKey(0)
  ws = make_weights(key)
  x = jax.random.normal(jax.random.fold_in(key, 99),
                        (args.batch, args.size, args.size, LAYERS[0][0]))
  setting = (f"batch {args.batch}, {args.size}x{args.size}, median of "
             f"{args.repeats}")
  print(f"== layers: the last four MobileNetV2 convolutions, {setting}")
  rows, base = [], None
  for method, eps in CASES:
    loss = make_loss(method, eps)
    states = init_states(method, x, ws)
    if states is not None:  # one step to start the warm state
      _, states = jax.jit(loss)(ws, x, states)
    value = lambda ws, x, s, loss=loss: loss(ws, x, s)[0]
    # The forward pass with its residuals kept: returning jax.vjp's closure
    # keeps what the backward needs alive (a forward that returns only the
    # loss lets XLA delete the whole compression as dead code).
    forward = lambda ws, x, s, value=value: jax.vjp(
        lambda w: value(w, x, s), ws)
    t_fwd = time_fn(jax.jit(forward), (ws, x, states), args.repeats)
    t_step = time_fn(jax.jit(jax.value_and_grad(value)), (ws, x, states),
                     args.repeats)
    row = dict(method=method, eps=eps, forward_s=t_fwd, step_s=t_step,
               backward_s=t_step - t_fwd)
    if base is None:
      base = row
    for k in ("forward", "backward", "step"):
      row[f"{k}_ratio"] = row[f"{k}_s"] / base[f"{k}_s"]
    rows.append(row)
  print(f"{'method':<10} {'eps':>4} {'fwd ms':>8} {'bwd ms':>8} "
        f"{'step ms':>8} {'fwd x':>6} {'bwd x':>6} {'step x':>6}")
  for r in rows:
    eps = "-" if r["eps"] is None else f"{r['eps']:.1f}"
    print(f"{r['method']:<10} {eps:>4} {1e3 * r['forward_s']:>8.2f} "
          f"{1e3 * r['backward_s']:>8.2f} {1e3 * r['step_s']:>8.2f} "
          f"{r['forward_ratio']:>6.2f} {r['backward_ratio']:>6.2f} "
          f"{r['step_ratio']:>6.2f}")
  return dict(setting=setting, batch=args.batch, size=args.size,
              repeats=args.repeats, rows=rows)


def bench_step(args) -> dict:
  """The ``step`` section: train.py's whole jitted fine-tuning step."""
  b, s, k = args.step_batch, args.step_size, args.step_layers
  targs = training.TrainConfig(
      model="mobilenet_v2", weights="none", layers=str(k), optimizer="sgd",
      batch_size=b, image_size=s, rank_control="off")
  spec = models.get_spec(targs.model)
  model = spec.build(num_classes=args.step_classes)
  variables = models.init(model, s, targs.seed)
  shape = (b, s, s, 3)
  layers = lvr.discover(model, jax.ShapeDtypeStruct(shape, jnp.float32),
                        variables=variables, train=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, shape, dtype=np.uint8)
  labels = rng.integers(0, args.step_classes, (b,), dtype=np.int32)
  setting = (f"MobileNetV2 at {s}x{s}, batch {b}, {args.step_classes} "
             f"classes, random init, "
             + ("every conv" if str(k) == "all" else f"last {k} convs")
             + f" and the classifier trained, SGD; median of {args.repeats} "
             "steps after 2 warm-up steps")
  print(f"== step: a whole fine-tuning train step, {setting}")
  rows, base = [], None
  for method, eps in CASES:
    targs = targs.replace(eps=0.8 if eps is None else eps)
    settings = training.settings_for(method, targs)
    plan = lvr.make_plan(layers,
                         training.make_rules(targs, layers, spec, settings))
    trained, frozen = plan.split(variables)
    # The step donates its state: give it copies, not the shared variables.
    trained = jax.tree_util.tree_map(jnp.copy, trained)
    tx = training.make_optimizer(targs)
    state = training.initial_state(trained, tx, training.init_asi_state(
        model, plan, variables, jax.ShapeDtypeStruct(shape, jnp.float32)))
    step = training.make_train_step(model, plan, tx, targs.seed, s)
    times = []
    for i in range(2 + args.repeats):
      t0 = time.perf_counter()
      state, metrics = step(state, frozen, images, labels)
      jax.block_until_ready((state, metrics))
      if i >= 2:
        times.append(time.perf_counter() - t0)
    row = dict(method=method, eps=eps, step_s=float(np.median(times)),
               loss=float(metrics["loss"]))
    if base is None:
      base = row
    row["step_ratio"] = row["step_s"] / base["step_s"]
    rows.append(row)
    del state, step
  print(f"{'method':<10} {'eps':>4} {'step ms':>9} {'step x':>6}")
  for r in rows:
    eps = "-" if r["eps"] is None else f"{r['eps']:.1f}"
    print(f"{r['method']:<10} {eps:>4} {1e3 * r['step_s']:>9.2f} "
          f"{r['step_ratio']:>6.2f}")
  return dict(setting=setting, model="mobilenet_v2", batch=b, size=s,
              layers=k, classes=args.step_classes, repeats=args.repeats,
              trained=list(plan.trainable), rows=rows)


@contextlib.contextmanager
def busy_processes(n: int):
  """``n`` processes that spin on the CPU while the block runs."""
  procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
           for _ in range(n)]
  try:
    yield
  finally:
    for p in procs:
      p.kill()
      p.wait()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", choices=("layers", "step"), default=None,
                      help="run one section only (default: both)")
  parser.add_argument("--batch", type=int, default=64,
                      help="layers: batch size")
  parser.add_argument("--size", type=int, default=7,
                      help="layers: spatial size of the convolutions' input")
  parser.add_argument("--step-batch", type=int, default=64,
                      help="step: batch size")
  parser.add_argument("--step-size", type=int, default=224,
                      help="step: image size")
  parser.add_argument("--step-layers", default="4",
                      help="step: the last k convolutions are fine-tuned "
                      "('all': every one)")
  parser.add_argument("--step-classes", type=int, default=10,
                      help="step: classifier size")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", default=None)
  parser.add_argument("--contend", type=int, default=0,
                      help="busy processes started beside the timing (a "
                           "second job on the cores)")
  parser.add_argument("--lapack-threads", choices=("library", "openblas"),
                      default="library",
                      help="library: the decompositions' one-thread LAPACK "
                           "default; openblas: OpenBLAS's own thread count")
  args = parser.parse_args(argv)
  if args.lapack_threads == "openblas":
    lv.set_cpu_lapack_threads(None)
  device = jax.devices()[0]
  print(f"{datetime.date.today()} jax {jax.__version__} on "
        f"{device.platform}:{device.device_kind} ({platform.machine()}); "
        f"{args.contend} busy processes beside; LAPACK threads: "
        f"{args.lapack_threads}")
  sections = {}
  with busy_processes(args.contend):
    if args.only in (None, "layers"):
      sections["layers"] = bench_layers(args)
    if args.only in (None, "step"):
      sections["step"] = bench_step(args)
  result = dict(device=f"{device.platform}:{device.device_kind}",
                jax=jax.__version__, date=datetime.date.today().isoformat(),
                machine=platform.machine(), contend=args.contend,
                lapack_threads=args.lapack_threads, sections=sections)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
