"""Which eigen-solver a compressed layer should call on a GPU: measured.

The HOSVD forward of MobileNetV2's last four convolutions spends its time
in ``eigh`` of the mode Grams (one per mode and layer, 7×7 to 960×960).
This script times, on whatever device JAX sees:

* ``solvers``: one symmetric ``n×n`` Gram (an activation-like spectrum: a
  random ``n×4n`` matrix whose row scales fall geometrically over three
  decades) through
  jaxlib's default ``eigh`` (cuSOLVER ``syevj`` up to 32×32, ``syevd``
  above), ``syevd`` and ``syevj`` at every size, four such Grams in one
  batched call (per Gram), a top-``n/4`` block subspace iteration (four
  products with the Gram, Cholesky QR, Rayleigh–Ritz by ``syevj``), and
  for ASI's shapes ``jnp.linalg.qr`` of an ``n×n/4`` block against
  Cholesky QR2. Each figure is the median of ``--repeats`` jitted calls
  after compile and warm-up.
* ``layers``: experiments/bench_speed.py's layers section (forward with its
  residual kept, backward, step) for vanilla, HOSVD(0.9), SVD(0.9) and ASI,
  once per :func:`lowrank_vjp.set_gpu_eigh` choice (jaxlib's default and
  ``"jacobi"``; only the default off a GPU).

It writes ``gpu_eigh_<device kind>_<date>[_smoke].json`` into ``--out``.
``--choice FILE`` prints the :func:`lowrank_vjp.set_gpu_eigh` value whose
HOSVD(0.9) layers step was faster in that file (empty for jaxlib's
default), for ``LOWRANK_VJP_GPU_EIGH`` (experiments/gpu_lease.sh).

Usage:
  python experiments/gpu_eigh.py --out docs/benchmarks/gpu
  python experiments/gpu_eigh.py --smoke          # CPU, seconds
  python experiments/gpu_eigh.py --choice docs/benchmarks/gpu/gpu_eigh_….json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
from jax import lax

import lowrank_vjp as lv

_HI = lax.Precision.HIGHEST
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks",
                                                "gpu"))
  p.add_argument("--sizes", default="7,64,160,320,960,1280")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--sections", default="solvers,layers")
  p.add_argument("--layer-batch", type=int, default=64)
  p.add_argument("--layer-size", type=int, default=7)
  p.add_argument("--choice", default=None, metavar="JSON",
                 help="print the faster solver choice of a result, and exit")
  args = p.parse_args(argv)
  if args.smoke:
    args.sizes, args.repeats = "7,40", 2
    args.layer_batch, args.layer_size = 2, 3
  return args


def median_time(fn, *args, repeats):
  """bench_speed's timing: the median of ``repeats`` calls after two."""
  return load_bench_speed().time_fn(fn, args, repeats)


def activation_gram(n: int, key) -> jax.Array:
  """A full-rank Gram whose spectrum falls over six decades, at every n."""
  scales = 10.0 ** (-3.0 * jnp.arange(n, dtype=jnp.float32) / n)
  a = scales[:, None] * jax.random.normal(key, (n, 4 * n), jnp.float32)
  return jnp.dot(a, a.T, precision=_HI)


def _eigh(impl):
  if impl is None:
    return lambda g: jnp.linalg.eigh(g)[0]
  kind = getattr(lax.linalg.EighImplementation, impl)
  return lambda g: lax.linalg.eigh(g, implementation=kind)[1]


def cholesky_qr2(y):
  """Orthonormal columns spanning ``y``: Cholesky QR, twice."""
  for _ in range(2):
    c = jnp.linalg.cholesky(jnp.dot(y.T, y, precision=_HI))
    y = lax.linalg.triangular_solve(c, y, left_side=False, lower=True,
                                    transpose_a=True)
  return y


def subspace_top(g, k, rr_impl, iterations=4):
  """Top-``k`` Ritz values of ``g`` by block subspace iteration."""
  # A random start: the test Gram's leading vectors lie near its first
  # coordinates, which an identity start would favour.
  q = cholesky_qr2(jax.random.normal(jax.random.PRNGKey(1), (g.shape[0], k),
                                     g.dtype))
  for _ in range(iterations):
    q = cholesky_qr2(jnp.dot(g, q, precision=_HI))
  small = jnp.dot(q.T, jnp.dot(g, q, precision=_HI), precision=_HI)
  return _eigh(rr_impl)(0.5 * (small + small.T))


def solvers(args, gpu: bool) -> dict:
  sizes = [int(s) for s in args.sizes.split(",")]
  impls = {"default": None, "syevd": "QR"}
  if gpu:
    impls["syevj"] = "JACOBI"
  rows = []
  for n in sizes:
    g = activation_gram(n, jax.random.PRNGKey(n))
    row = {"n": n}
    for name, impl in impls.items():
      f = jax.jit(_eigh(impl))
      row[name] = median_time(f, g, repeats=args.repeats)
      batch = jnp.stack([g] * 4)
      row[f"{name} x4 batched, per Gram"] = median_time(
          f, batch, repeats=args.repeats) / 4
    k = max(2, n // 4)
    rr = "JACOBI" if gpu else None
    row[f"subspace top n/4 (k={k})"] = median_time(
        jax.jit(lambda g, k=k, rr=rr: subspace_top(g, k, rr)), g,
        repeats=args.repeats)
    y = jax.random.normal(jax.random.PRNGKey(7), (n, k), jnp.float32)
    row[f"qr {n}x{k}"] = median_time(jax.jit(lambda y: jnp.linalg.qr(y)[0]),
                                     y, repeats=args.repeats)
    row[f"cholesky qr2 {n}x{k}"] = median_time(jax.jit(cholesky_qr2), y,
                                               repeats=args.repeats)
    rows.append(row)
    print(f"n={n}: " + ", ".join(f"{key} {1e3 * v:.3f} ms"
                                 for key, v in row.items() if key != "n"),
          flush=True)
  return {"rows": rows, "repeats": args.repeats, "units": "seconds"}


@functools.cache
def load_bench_speed():
  spec = importlib.util.spec_from_file_location(
      "bench_speed", os.path.join(ROOT, "experiments", "bench_speed.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def layers(args, gpu: bool) -> dict:
  bench = load_bench_speed()
  bench.CASES = [("vanilla", None), ("hosvd", 0.9), ("svd", 0.9),
                 ("asi", None)]
  out = {}
  for choice in ((None, "jacobi") if gpu else (None,)):
    lv.set_gpu_eigh(choice)
    print(f"-- lv.set_gpu_eigh({choice!r})", flush=True)
    try:
      out[str(choice)] = bench.bench_layers(argparse.Namespace(
          batch=args.layer_batch, size=args.layer_size,
          repeats=args.repeats))
    except Exception as e:  # pylint: disable=broad-except  # the next runs
      out[str(choice)] = {"error": repr(e)}
      print(f"failed: {e!r}", flush=True)
  lv.set_gpu_eigh(None)
  return out


def faster_choice(result: dict) -> str:
  """The solver choice (``""``: jaxlib's default) whose HOSVD(0.9) step was
  fastest in ``result``'s layers section; ``""`` when it has none."""
  times = {}
  for choice, section in result["sections"].get("layers", {}).items():
    for row in section.get("rows", []) if isinstance(section, dict) else []:
      if row["method"] == "hosvd" and row["eps"] == 0.9:
        times[choice] = row["step_s"]
  if not times:
    return ""
  best = min(times, key=times.get)
  return "" if best == "None" else best


def main(argv=None) -> dict:
  args = parse(argv)
  if args.choice:
    with open(args.choice) as f:
      print(faster_choice(json.load(f)))
    return {}
  device = jax.devices()[0]
  gpu = device.platform == "gpu"
  result = {"device": str(device.device_kind), "platform": device.platform,
            "jax": jax.__version__, "date": datetime.date.today().isoformat(),
            "smoke": args.smoke, "sections": {}}
  os.makedirs(args.out, exist_ok=True)
  kind = str(device.device_kind).lower().replace(" ", "-")
  path = os.path.join(args.out, f"gpu_eigh_{kind}_{result['date']}"
                      f"{'_smoke' if args.smoke else ''}.json")
  for name in args.sections.split(","):
    t = time.perf_counter()
    result["sections"][name] = {"solvers": solvers, "layers": layers}[name](
        args, gpu)
    result["sections"][name]["wall_s"] = time.perf_counter() - t
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
