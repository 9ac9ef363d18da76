"""XLA temp bytes of one HOSVD conv: the activation's scaling held once.

Before its mode Grams, HOSVD scales the activation by a power of two
(``lowrank_vjp._src.tensor.hosvd.normalize``). Written as a multiplication
by ``2**-e``, XLA copied the multiply into the input fusion of every mode
Gram and held up to four scaled copies at once; the library divides by
``2**e`` instead (the same exact result), which XLA computes once.

For one convolution (default: MobileNetV2's 1×1 projection 960 → 320 on a
64×7×7×960 f32 input, ``"VALID"``) this prints the temp bytes of the
compiled ``jax.grad`` of ``sum(y²)`` (``lv.measure.xla_memory``) for

* ``vanilla``: ``lax.conv_general_dilated``;
* ``hosvd``: ``lv.compressed_conv(method="hosvd", eps=ε)`` as it is;
* ``hosvd, multiply``: the same with ``normalize`` swapped, for this run
  only, for the multiply it used before the fix (the reconstruction of the
  old code is ``_multiply_normalize`` below).

docs/memory.md's pitfalls table quotes these figures;
``tests/tensor/test_tensor_hosvd.py::test_scaled_activation_is_held_once``
guards the division at a smaller shape.

Usage:
  python experiments/memory_scaling.py [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json

import jax
import jax.numpy as jnp
from jax import lax

import lowrank_vjp as lv
from lowrank_vjp import training
from lowrank_vjp._src.tensor import hosvd

DN = ("NHWC", "HWIO", "NHWC")


def _multiply_normalize(x):
  """``normalize`` as it was before the fix: ``x * 2**-e``."""
  ct = hosvd.compute_dtype(x.dtype)
  peak = jnp.max(jnp.abs(x)).astype(ct)
  ok = jnp.isfinite(peak) & (peak > 0)
  exponent = jnp.where(ok, jnp.floor(jnp.log2(jnp.where(ok, peak, 1.0))), 0.0)
  scale = jnp.exp2(-exponent).astype(ct)
  return x.astype(ct) * scale, 1.0 / scale


@contextlib.contextmanager
def _multiplied():
  kept = hosvd.normalize
  hosvd.normalize = _multiply_normalize
  try:
    yield
  finally:
    hosvd.normalize = kept


def temp_bytes(conv, x_shape, w_shape) -> int:
  """Temp bytes of the compiled gradient of ``sum(conv(x, w)²)``."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  w = jax.ShapeDtypeStruct(w_shape, jnp.float32)

  def loss(w, x):
    return jnp.sum(jnp.square(conv(x, w, (1, 1), "VALID",
                                   dimension_numbers=DN)))

  return lv.measure.xla_memory(jax.grad(loss), w, x).temp_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=7)
  parser.add_argument("--channels", type=int, default=960)
  parser.add_argument("--out-channels", type=int, default=320)
  parser.add_argument("--eps", type=float, default=0.9)
  parser.add_argument("--json", default=None, help="also write rows here")
  args = parser.parse_args()
  x_shape = (args.batch, args.size, args.size, args.channels)
  w_shape = (1, 1, args.channels, args.out_channels)
  act = 4 * args.batch * args.size * args.size * args.channels
  hosvd_conv = lv.compressed_conv(method="hosvd", eps=args.eps,
                                  on_overflow="ignore")
  rows = [dict(method="vanilla",
               temp_bytes=temp_bytes(lax.conv_general_dilated, x_shape,
                                     w_shape)),
          dict(method="hosvd", temp_bytes=temp_bytes(hosvd_conv, x_shape,
                                                     w_shape))]
  with _multiplied():
    rows.append(dict(method="hosvd, multiply",
                     temp_bytes=temp_bytes(hosvd_conv, x_shape, w_shape)))
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; input "
        f"{x_shape} f32 = {act / 2**20:.2f} MiB, 1x1 kernel {w_shape}")
  for r in rows:
    print(f"{r['method']:<16} {r['temp_bytes'] / 2**20:>8.1f} MiB temp "
          f"{r['temp_bytes'] / act:>6.2f} x activation")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(command="python experiments/memory_scaling.py",
                     environment=training.environment(), input_shape=x_shape,
                     kernel_shape=w_shape, eps=args.eps,
                     activation_bytes=act, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
