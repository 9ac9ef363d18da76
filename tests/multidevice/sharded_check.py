"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8; prints JSON.

Called by tests/ops/test_sharding.py in a fresh process (the device count must be
set before JAX starts).
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lowrank_vjp as lv
from lowrank_vjp._src.ops import conv_tucker

DN = ("NHWC", "HWIO", "NHWC")


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def gathers(hlo):
  """Shapes of all-gather results in compiled HLO text."""
  return re.findall(r"= (\w+\[[\d,]*\])[^=]*? all-gather\(", hlo)


def main():
  out = {"devices": len(jax.devices())}
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (16, 8, 8, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 5))

  def loss(conv):
    return lambda w, x: jnp.sum(jnp.sin(conv(x, w, (1, 1), "SAME",
                                             dimension_numbers=DN)))

  ref = jax.grad(loss(lax.conv_general_dilated), argnums=(0, 1))(w, x)
  for axis_type in ("explicit", "auto"):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(
        AxisType.Explicit if axis_type == "explicit" else AxisType.Auto,))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ws = jax.device_put(w, NamedSharding(mesh, P()))
    for method in ("hosvd", "svd"):
      conv = lv.compressed_conv(method=method, eps=1.0)
      step = jax.jit(jax.grad(loss(conv), argnums=(0, 1)))
      try:
        g = step(ws, xs)
        hlo = step.lower(ws, xs).compile().as_text()
        out[f"{axis_type}/{method}"] = dict(
            dw_err=rel(g[0], ref[0]), dx_err=rel(g[1], ref[1]),
            gathers=gathers(hlo), all_reduces=hlo.count(" all-reduce("),
            dx_sharding=str(g[1].sharding.spec))
      except Exception as e:  # pylint: disable=broad-except
        out[f"{axis_type}/{method}"] = dict(error=f"{type(e).__name__}: {e}")
  # Statistics come back per device.
  mesh = jax.make_mesh((8,), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  _, stats = jax.jit(lambda x, w: lv.compressed_conv(eps=0.9).with_stats(
      x, w, (1, 1), "SAME", dimension_numbers=DN))(xs, w)
  out["stats_shape"] = list(stats.needed_ranks.shape)
  out["stats_local_shape"] = list(stats.shape)
  # Dense with a sharded batch.
  xd = jax.device_put(jax.random.normal(key, (16, 3, 6)),
                      NamedSharding(mesh, P("data")))
  wd = jax.random.normal(jax.random.PRNGKey(2), (6, 2))
  dn = (((2,), (0,)), ((), ()))
  dense = lv.compressed_dense(eps=1.0)
  f = lambda d: lambda w, x: jnp.sum(jnp.sin(d(x, w, dn)))
  gd = jax.jit(jax.grad(f(dense), argnums=(0, 1)))(wd, xd)
  rd = jax.grad(f(lax.dot_general), argnums=(0, 1))(wd, np.asarray(xd))
  out["dense"] = dict(dw_err=rel(gd[0], rd[0]), dx_err=rel(gd[1], rd[1]))
  out.update(per_shard_semantics(x, w, loss))
  print(json.dumps(out))


def _per_shard_reference(conv, loss, w, x, shards=8):
  """``Σ_d grad(loss)(w, x_d)``: each shard compressed on its own."""
  xs = np.split(np.asarray(x), shards)
  # Jitted on one device (one compile for all shards; op by op, eager
  # dispatch compiled hundreds of small programs, most of this script's time).
  grad = jax.jit(jax.grad(loss(conv)))
  total = 0
  for xd in xs:
    total = total + grad(np.asarray(w), jnp.asarray(xd))
  return total


def per_shard_semantics(x, w, loss):
  """ε < 1 on explicit axes, and compressed layers inside a user's shard_map.

  Both compress each device's shard on its own; the weight gradient is the
  sum of the per-shard ones, which the reference computes without a mesh.
  """
  out = {}
  methods = {"hosvd(0.7)": lv.methods.Hosvd(eps=0.7, on_overflow="ignore"),
             "svd(0.7)": lv.methods.Svd(eps=0.7, on_overflow="ignore"),
             "hosvd(1)": lv.methods.Hosvd(eps=1.0),
             "gradfilter": lv.methods.GradFilter(radius=2),
             "quant": lv.methods.Quant(bits=4),
             "checkpoint": lv.methods.Checkpoint(),
             "none": lv.methods.Vanilla()}
  explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  xs = jax.device_put(x, NamedSharding(explicit, P("data")))
  ws = jax.device_put(w, NamedSharding(explicit, P()))
  for name, method in methods.items():
    conv = lv.compressed_conv(method=method)
    want = _per_shard_reference(conv, loss, w, x)
    try:
      got = jax.jit(jax.grad(loss(conv)))(ws, xs)
      out[f"explicit_eps/{name}"] = dict(dw_err=rel(got, want))
    except Exception as e:  # pylint: disable=broad-except
      out[f"explicit_eps/{name}"] = dict(error=f"{type(e).__name__}: {e}")

    def local(w, x, conv=conv):
      return jax.grad(loss(conv))(w, x)

    user = jax.jit(jax.shard_map(local, mesh=explicit, in_specs=(P(), P("data")),
                                 out_specs=P()))
    try:
      got = user(ws, xs)
      out[f"user_shard_map/{name}"] = dict(dw_err=rel(got, want))
    except Exception as e:  # pylint: disable=broad-except
      out[f"user_shard_map/{name}"] = dict(error=f"{type(e).__name__}: {e}")
  # The conv path's weight gradient summed over batch-rank slabs (forced):
  # the scan's carry must have the slabs' varying type.
  conv = lv.compressed_conv(method=lv.methods.Hosvd(eps=1.0, rank_fraction=1.0))
  want = _per_shard_reference(conv, loss, w, x)
  slab_fraction = conv_tucker._SLAB_FRACTION  # pylint: disable=protected-access
  conv_tucker._SLAB_FRACTION = 1 << 30  # pylint: disable=protected-access
  try:
    local = lambda w, x: jax.grad(loss(conv))(w, x)
    user = jax.jit(jax.shard_map(local, mesh=explicit,
                                 in_specs=(P(), P("data")), out_specs=P()))
    out["user_shard_map/slabs"] = dict(dw_err=rel(user(ws, xs), want))
  except Exception as e:  # pylint: disable=broad-except
    out["user_shard_map/slabs"] = dict(error=f"{type(e).__name__}: {e}")
  finally:
    conv_tucker._SLAB_FRACTION = slab_fraction  # pylint: disable=protected-access
  return out


if __name__ == "__main__":
  main()
