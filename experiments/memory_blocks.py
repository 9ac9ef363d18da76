"""Bytes each added conv → BatchNorm → ReLU block keeps, by method.

For a stack of identical blocks (3×3 convolution, stride 1, "SAME", as many
output as input channels; BatchNorm; ReLU) trained with ``jax.grad`` under
``jax.jit`` (gradients reduced to scalars, see ``_step``), prints the slope
of XLA's compiled temp bytes over the stack's depth
(``lv.measure.temp_bytes_per_layer``) beside what the method's formula says
a block keeps and the jaxpr-level residual bytes per block (kernel
excluded). Rows:

* ``none`` / ``hosvd`` / ``svd`` / ``gradfilter`` / ``quant-8`` /
  ``quant-4``: ``lv.compressed_conv(method=...)`` → ``lv.frozen_batch_norm``
  (fine-tuning, keeps nothing) → ``lv.relu`` (1-bit mask). Formula: the
  conv's residual (``CompressionStats.residual_nbytes``) + the packed mask.
* ``checkpoint``: the whole vanilla block under ``lv.checkpointed`` (saves
  nothing inside it). Formula: the block's input.
* ``none + train BN``: vanilla conv, BatchNorm with batch statistics and
  trained scale/bias (plain ``jnp``), ``lv.relu``: what JAX's autodiff
  keeps, for reference (no formula).
* ``fused quant-K``: ``lv.bn_relu_conv`` (training-mode BatchNorm, as in
  Chakrabarti & Moseley); the chain conv₀ → (BN → ReLU → conv)×L is the same
  sequence of ops as L conv → BN → ReLU blocks. Formula: the packed codes +
  ``4·C`` bytes of statistics.

Usage:
  python experiments/memory_blocks.py [--batch 8] [--size 16] [--channels 32]
      [--depths 8,12,16] [--only none,quant-4] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform

import jax
import jax.numpy as jnp
from jax import lax

import lowrank_vjp as lv

DN = ("NHWC", "HWIO", "NHWC")


def _step(loss):
  """``jax.grad(loss)`` with every gradient reduced to a scalar, jitted.

  XLA parks small residuals in the (otherwise idle) output buffers of the
  weight gradients, which hides up to one gradient's bytes per block from
  ``temp_bytes``; with scalar outputs every residual shows in temp.
  """
  def step(*args):
    grads = jax.grad(loss)(*args)
    return jax.tree_util.tree_map(lambda g: jnp.sum(g * g), grads)
  return jax.jit(step)


def _params(shape, depth):
  c = shape[-1]
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, shape)
  ws = [jax.random.normal(jax.random.fold_in(key, i), (3, 3, c, c))
        * (2.0 / (9 * c)) ** 0.5 for i in range(depth)]
  bn = [(jnp.zeros(c), jnp.ones(c), jnp.ones(c), jnp.full((c,), 0.1))
        for _ in range(depth)]
  return x, ws, bn


def frozen_stack(conv):
  """conv → frozen BN → lv.relu, ``depth`` times."""
  def build(shape):
    def make(depth):
      x, ws, bn = _params(shape, depth)

      def loss(ws, x):
        for w, stats in zip(ws, bn, strict=True):
          x = lv.relu(lv.frozen_batch_norm(
              conv(x, w, (1, 1), "SAME", dimension_numbers=DN), *stats))
        return jnp.sum(x)
      return loss, (ws, x)
    return make
  return build


def _train_bn(y, scale, bias, epsilon=1e-5):
  mean = jnp.mean(y, axis=(0, 1, 2))
  var = jnp.var(y, axis=(0, 1, 2))
  return (y - mean) * lax.rsqrt(var + epsilon) * scale + bias


def train_bn_stack(shape):
  """Vanilla conv → training-mode BN (trained scale, bias) → lv.relu."""
  def make(depth):
    x, ws, bn = _params(shape, depth)
    affine = [(s, b) for _, _, s, b in bn]

    def loss(params, x):
      for w, (s, b) in zip(*params, strict=True):
        y = lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=DN)
        x = lv.relu(_train_bn(y, s, b))
      return jnp.sum(x)
    return loss, ((ws, affine), x)
  return make


def checkpoint_stack(shape):
  """The vanilla block (frozen BN) under ``lv.checkpointed``."""
  @lv.checkpointed
  def block(x, w, stats):
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
    return lv.relu(lv.frozen_batch_norm(y, *stats))

  def make(depth):
    x, ws, bn = _params(shape, depth)

    def loss(ws, x):
      for w, stats in zip(ws, bn, strict=True):
        x = block(x, w, stats)
      return jnp.sum(x)
    return loss, (ws, x)
  return make


def fused_stack(bits):
  """conv₀, then (BN → ReLU → conv) units saving ``bits``-bit codes."""
  def build(shape):
    def make(depth):
      x, ws, bn = _params(shape, depth + 1)
      affine = [(s, b) for _, _, s, b in bn[1:]]

      def loss(params, x):
        w0, ws, affine = params
        u = lax.conv_general_dilated(x, w0, (1, 1), "SAME",
                                     dimension_numbers=DN)
        for w, (s, b) in zip(ws, affine, strict=True):
          u = lv.bn_relu_conv(u, w, s, b, (1, 1), "SAME",
                              dimension_numbers=DN, bits=bits)[0]
        return jnp.sum(u)
      return loss, ((ws[0], ws[1:], affine), x)
    return make
  return build


def cases(eps: float):
  """``(name, stack builder, formula(shape) -> bytes per block or None)``.

  A stack builder maps ``shape`` to ``depth -> (loss, args)``.
  """

  def conv_formula(**kw):
    conv = lv.compressed_conv(**kw)

    def formula(shape):
      x = jax.ShapeDtypeStruct(shape, jnp.float32)
      w = jax.ShapeDtypeStruct((3, 3, shape[-1], shape[-1]), jnp.float32)
      stats = jax.eval_shape(lambda x, w: conv.with_stats(
          x, w, (1, 1), "SAME", dimension_numbers=DN)[1], x, w)
      return stats.residual_nbytes + 4 * math.ceil(math.prod(shape) / 32)
    return conv, formula

  rows = []
  for name, kw in (("none", dict(method="none")),
                   (f"hosvd({eps})", dict(method="hosvd", eps=eps,
                                          on_overflow="ignore")),
                   (f"svd({eps})", dict(method="svd", eps=eps,
                                        on_overflow="ignore")),
                   ("gradfilter r2", dict(method="gradfilter", radius=2)),
                   ("gradfilter r4", dict(method="gradfilter", radius=4)),
                   ("quant-8", dict(method="quant", bits=8)),
                   ("quant-4", dict(method="quant", bits=4)),
                   ("quant-2", dict(method="quant", bits=2))):
    conv, formula = conv_formula(**kw)
    rows.append((name, frozen_stack(conv), formula))
  act = lambda shape: 4 * math.prod(shape)
  rows.append(("checkpoint (block)", checkpoint_stack, act))
  rows.append(("none + train BN", train_bn_stack, None))
  for bits in (8, 4):
    rows.append((f"fused quant-{bits} (train BN)", fused_stack(bits),
                 lambda s, b=bits: 4 * math.ceil(math.prod(s) * b / 32)
                 + 4 * s[-1]))
  return rows


def per_block(build, shape, depths):
  """``(XLA bytes per block, jaxpr bytes per block, XLA temps)``.

  The jaxpr figure is the slope of the VJP's residual bytes over the depth,
  less the kernel (a parameter, alive anyway) that every block's VJP holds.
  """
  make = build(shape)

  def compiled(depth):
    loss, args = make(depth)
    return _step(loss), args

  def jaxpr_bytes(depth):
    loss, args = make(depth)
    return lv.measure.vjp_residual_bytes(loss, *args)

  slope, temps = lv.measure.temp_bytes_per_layer(compiled, depths)
  kernel = 4 * 9 * shape[-1] ** 2
  per = ((jaxpr_bytes(depths[-1]) - jaxpr_bytes(depths[0]))
         / (depths[-1] - depths[0]) - kernel)
  return slope, per, temps


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=16)
  parser.add_argument("--channels", type=int, default=32)
  parser.add_argument("--eps", type=float, default=0.9)
  parser.add_argument("--depths", default="8,12,16")
  parser.add_argument("--only", default=None,
                      help="comma-separated row names to run")
  parser.add_argument("--json", default=None, help="also write rows here")
  args = parser.parse_args()
  shape = (args.batch, args.size, args.size, args.channels)
  depths = tuple(int(d) for d in args.depths.split(","))
  act = 4 * math.prod(shape)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({platform.machine()}), {datetime.date.today()}; block input "
        f"{shape} f32 = {act / 2**10:.0f} KiB; 3x3 conv {args.channels}->"
        f"{args.channels}, stride 1, SAME; depths {depths}")
  print(f"{'method':<28} {'formula KiB':>11} {'jaxpr KiB':>9} "
        f"{'XLA KiB':>9} {'XLA/formula':>11} {'XLA/act':>8}")
  out = []
  only = None if args.only is None else set(args.only.split(","))
  for name, build, formula in cases(args.eps):
    if only is not None and name not in only:
      continue
    slope, jaxpr, temps = per_block(build, shape, depths)
    f = formula(shape) if formula is not None else None
    out.append(dict(method=name, formula_bytes=f, jaxpr_bytes_per_block=jaxpr,
                    xla_bytes_per_block=slope, temps=temps, depths=depths,
                    shape=shape))
    ratio = f"{slope / f:>11.3f}" if f else f"{'-':>11}"
    formula_kib = f"{f / 2**10:>11.1f}" if f else f"{'-':>11}"
    print(f"{name:<28} {formula_kib} {jaxpr / 2**10:>9.1f} "
          f"{slope / 2**10:>9.1f} {ratio} {slope / act:>8.3f}", flush=True)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
