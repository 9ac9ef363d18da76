"""XLA temp bytes per added conv → lv.relu layer, by method.

Prints, for a stack of identical 3×3 convolutions each followed by
``lv.relu``, the bytes XLA's compiled training step (``jax.grad`` under
``jax.jit``) adds per layer, against the activation size. This is the figure
the core issue asks for; docs/memory.md records its output.

Usage:
  python experiments/memory_stack.py [--batch 8] [--size 32] [--channels 32]
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
from jax import lax

import lowrank_vjp as lv

DN = ("NHWC", "HWIO", "NHWC")


def build(conv, act, shape):
  def make(depth):
    def loss(ws, x):
      for w in ws:
        x = act(conv(x, w, (1, 1), "SAME", dimension_numbers=DN))
      return jnp.sum(x)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, shape)
    ws = [0.05 * jax.random.normal(jax.random.fold_in(key, i),
                                   (3, 3, shape[-1], shape[-1]))
          for i in range(depth)]
    # Reduce the gradients to a scalar: with array outputs XLA may place
    # residuals inside the idle gradient output buffers, where temp bytes
    # do not count them.
    def step(ws, x):
      return sum(jnp.vdot(g, g) for g in jax.grad(loss)(ws, x))
    return jax.jit(step), (ws, x)
  return make


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=32)
  parser.add_argument("--eps", type=float, default=0.9)
  parser.add_argument("--json", default=None, help="also write rows here")
  args = parser.parse_args()
  shape = (args.batch, args.size, args.size, args.channels)
  act_bytes = 4 * args.batch * args.size * args.size * args.channels
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({platform.machine()}); activation {shape} f32 = "
        f"{act_bytes / 2**20:.3f} MiB")
  print(f"{'method':<14} {'activation':<12} {'MiB/layer':>10} "
        f"{'x activation':>12}")
  rows = []
  cases = [("lax (vanilla)", lax.conv_general_dilated),
           ("none", lv.compressed_conv(method="none")),
           (f"hosvd({args.eps})", lv.compressed_conv(
               method="hosvd", eps=args.eps, on_overflow="ignore")),
           (f"svd({args.eps})", lv.compressed_conv(
               method="svd", eps=args.eps, on_overflow="ignore"))]
  for name, conv in cases:
    for act_name, act in (("lv.relu", lv.relu), ("jax.nn.relu", jax.nn.relu)):
      slope, temps = lv.measure.temp_bytes_per_layer(build(conv, act, shape))
      rows.append(dict(method=name, activation=act_name, bytes_per_layer=slope,
                       temps=temps, shape=shape))
      print(f"{name:<14} {act_name:<12} {slope / 2**20:>10.3f} "
            f"{slope / act_bytes:>12.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
