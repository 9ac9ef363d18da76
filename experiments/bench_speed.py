"""Step time of compressed vs vanilla convolutions, side by side in one run.

The last four convolutions of MobileNetV2 at 224×224 (torchvision's layout:
features.17's 1×1 expansion 160→960, 3×3 depthwise 960, 1×1 projection
960→320, and features.18's 1×1 320→1280, all at 7×7), batch 64 as in the
HOSVD paper, each followed by ``lv.relu6``. For every method it times, under
``jax.jit``, the forward pass (loss value), the training step (loss and
weight gradients) and their difference (the backward pass), and prints each
one's ratio to vanilla. Weights and inputs are random; at a fixed capacity the
work does not depend on ε (ε only masks components), so the ε rows differ
only by noise — both are printed to show it.

Usage:
  python experiments/bench_speed.py [--batch 64] [--repeats 10] [--json F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lowrank_vjp as lv

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
  if method == "vanilla":
    convs = [lax.conv_general_dilated] * len(LAYERS)
  elif method == "asi":
    convs = None
  else:
    convs = [lv.compressed_conv(method=method, eps=eps, on_overflow="ignore")
             ] * len(LAYERS)

  def loss(ws, x, states=None):
    new_states = []
    for i, (w, (_, _, k, groups)) in enumerate(zip(ws, LAYERS)):
      pad = "SAME" if k > 1 else "VALID"
      if convs is None:
        conv = lv.asi_conv()
        x, _, s = conv(x, w, (1, 1), pad, dimension_numbers=DN,
                       feature_group_count=groups, state=states[i])
        new_states.append(s)
      else:
        x = convs[i](x, w, (1, 1), pad, dimension_numbers=DN,
                     feature_group_count=groups)
      x = lv.relu6(x)
    return jnp.mean(jnp.square(x)), new_states

  return loss


def time_fn(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=7)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  key = jax.random.PRNGKey(0)
  ws = make_weights(key)
  x = jax.random.normal(jax.random.fold_in(key, 99),
                        (args.batch, args.size, args.size, LAYERS[0][0]))
  device = jax.devices()[0]
  print(f"{datetime.date.today()} jax {jax.__version__} on "
        f"{device.platform}:{device.device_kind} ({platform.machine()}), "
        f"batch {args.batch}, {args.size}x{args.size}, median of "
        f"{args.repeats}")
  cases = [("vanilla", 1.0)] + [(m, e) for m in ("hosvd", "svd", "asi")
                                for e in (0.8, 0.9)]
  rows, base = [], None
  for method, eps in cases:
    if method == "asi" and eps != 0.8:
      continue   # ASI has fixed ranks: ε plays no part
    loss = make_loss(method, eps)
    states = None
    if method == "asi":
      states = [lv.asi_conv().init_state(s) for s in _layer_inputs(x, ws)]
      # One step to start the warm state.
      _, states = jax.jit(loss)(ws, x, states)
    fwd = jax.jit(lambda ws, x, s: loss(ws, x, s)[0])
    step = jax.jit(jax.value_and_grad(lambda ws, x, s: loss(ws, x, s)[0]))
    t_fwd = time_fn(fwd, (ws, x, states), args.repeats)
    t_step = time_fn(step, (ws, x, states), args.repeats)
    row = dict(method=method, eps=None if method in ("vanilla", "asi")
               else eps, forward_s=t_fwd, step_s=t_step,
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
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=str(device.device_kind), jax=jax.__version__,
                     rows=rows), f, indent=1)


def _layer_inputs(x, ws):
  shapes = []
  for w, (_, _, k, groups) in zip(ws, LAYERS):
    shapes.append(x.shape)
    x = lax.conv_general_dilated(x, w, (1, 1), "SAME" if k > 1 else "VALID",
                                 dimension_numbers=DN,
                                 feature_group_count=groups)
  return shapes


if __name__ == "__main__":
  main()
