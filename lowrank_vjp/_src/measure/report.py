"""Memory report of a model: per-layer saved bytes and XLA's step figures.

:func:`memory_report` traces a loss function once (nothing is computed),
finds every ``compressed_conv`` / ``compressed_dense`` call in it through
:mod:`layer_log`, and lists per layer the bytes the method's formula gives
beside the bytes the layer's VJP really holds at the jaxpr level (the layer
traced alone; its weight excluded). It adds the whole step's jaxpr-level
residuals and XLA's compiled figures, and flags residuals as large as a
compressed layer's input that some other op keeps (:func:`full_size_residuals`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Sequence

import jax
import numpy as np

from lowrank_vjp._src import dropins
from lowrank_vjp._src.measure import layer_log as layer_log
from lowrank_vjp._src.measure import xla as measure

MiB = measure.MiB
_NOT_COMPRESSING = ("none", "checkpoint")
_OWN_SOURCE = os.path.join("lowrank_vjp", "_src", "")


class FullSizeResidualWarning(UserWarning):
  """An op keeps a tensor as large as a compressed layer's input."""


@dataclasses.dataclass(frozen=True)
class LayerBytes:
  """One row of a :class:`MemoryReport`.

  Attributes:
    name: Module path (Flax) or ``"conv_<i>"`` / ``"dense_<i>"``.
    method: Compression method.
    shape: The activation's shape.
    activation_bytes: What vanilla backprop keeps for it.
    formula_bytes: The method's formula for its residual (at the static
      capacity for the Tucker methods).
    measured_bytes: Bytes of the layer's VJP residuals at the jaxpr level,
      the layer traced alone, its weight excluded.
  """

  name: str
  method: str
  shape: tuple[int, ...]
  activation_bytes: int
  formula_bytes: int
  measured_bytes: int


@dataclasses.dataclass(frozen=True)
class Residual:
  """A residual of the whole function's VJP (jaxpr level).

  Attributes:
    shape: Its shape.
    dtype: Its dtype name.
    nbytes: Its bytes.
    source: Where JAX says it comes from (op and source line, or argument).
  """

  shape: tuple[int, ...]
  dtype: str
  nbytes: int
  source: str


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """What a training step keeps, per layer and in all.

  Attributes:
    layers: One :class:`LayerBytes` per compressed-layer call, in call
      order.
    vjp_bytes: All residuals of the function's VJP (jaxpr level, parameters
      the backward reads included).
    xla: XLA's figures for the jitted gradient step, or None if not
      compiled.
    full_size: Residuals with as many elements as the input of a
      compressing layer, kept by some other op (:func:`full_size_residuals`).
  """

  layers: tuple[LayerBytes, ...]
  vjp_bytes: int
  xla: measure.XlaMemory | None
  full_size: tuple[Residual, ...]

  def __str__(self) -> str:
    head = (f"{'layer':<32} {'method':<10} {'shape':<20} {'vanilla MiB':>11} "
            f"{'formula MiB':>11} {'measured MiB':>12}")
    lines = [head, "-" * len(head)]
    for r in self.layers:
      lines.append(
          f"{r.name:<32} {r.method:<10} {str(r.shape):<20} "
          f"{r.activation_bytes / MiB:>11.3f} {r.formula_bytes / MiB:>11.3f} "
          f"{r.measured_bytes / MiB:>12.3f}")
    total = lambda f: sum(f(r) for r in self.layers) / MiB
    lines.append(
        f"{'total':<32} {'':<10} {'':<20} "
        f"{total(lambda r: r.activation_bytes):>11.3f} "
        f"{total(lambda r: r.formula_bytes):>11.3f} "
        f"{total(lambda r: r.measured_bytes):>12.3f}")
    lines.append(f"whole step, jaxpr-level residuals: "
                 f"{self.vjp_bytes / MiB:.3f} MiB")
    if self.xla is not None:
      lines.append(str(self.xla))
    for r in self.full_size:
      lines.append(f"full-size residual {r.dtype}{list(r.shape)} "
                   f"({r.nbytes / MiB:.3f} MiB) {r.source}")
    return "\n".join(lines)


def _avals(args):
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), jax.numpy.result_type(a)),
      args)


def _layer_fn(record: layer_log.LayerRecord) -> Callable:
  spec, method = record.spec, record.method
  if method.stateful:
    return lambda lhs, rhs: dropins.run(spec, method, lhs, rhs,
                                        method.init_state(spec))[0]
  return lambda lhs, rhs: dropins.run(spec, method, lhs, rhs)[0]


def layer_residual_bytes(record: layer_log.LayerRecord) -> int:
  """Jaxpr-level bytes one layer's VJP keeps, its weight excluded."""
  lhs = jax.ShapeDtypeStruct(record.spec.lhs_shape, record.spec.lhs_dtype)
  rhs = jax.ShapeDtypeStruct(record.spec.rhs_shape, record.spec.rhs_dtype)
  closure = jax.eval_shape(
      lambda a, w: jax.vjp(_layer_fn(record), a, w)[1], lhs, rhs)
  total, weight_seen = 0, False
  for leaf in jax.tree_util.tree_leaves(closure):
    if (not weight_seen and tuple(leaf.shape) == tuple(rhs.shape)
        and leaf.dtype == rhs.dtype):
      weight_seen = True
      continue
    total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
  return total


def _saved_residuals(fn, args):
  try:
    from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
    return [(tuple(a.shape), np.dtype(a.dtype), src)
            for a, src in saved_residuals(fn, *args)]
  except Exception:  # pylint: disable=broad-except  # private API moved.
    closure = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
    return [(tuple(a.shape), np.dtype(a.dtype), "source unknown")
            for a in jax.tree_util.tree_leaves(closure)]


def full_size_residuals(fn: Callable, *args, warn: bool = True
                        ) -> tuple[Residual, ...]:
  """Residuals of ``fn``'s VJP as large as a compressed layer's input.

  A compressed layer only saves memory if nothing else keeps a tensor of its
  input's size: ``jax.nn.relu`` keeps its input, ``tanh`` its output (the
  next layer's input), SiLU/GELU both, a trained BatchNorm ``x - mean``,
  ``jax.checkpoint`` around a block its input. This lists, at the jaxpr
  level, every residual with as many elements as the input of a compressing
  layer in ``fn`` (methods other than ``"none"`` and ``"checkpoint"``) — a
  layer's input, a pre-activation feeding it, a normalised copy of it — in
  any dtype or layout, with JAX's description of where it comes from.
  Residuals that are arguments of ``fn`` (alive anyway), those the library's
  own rules save, and vectors are not listed; an intermediate input of an
  uncompressed layer is (expected). XLA may drop some (the zeros of ReLU's
  rule) or add others; its temp bytes are the final check.

  Args:
    fn: The function to differentiate (e.g. a loss of ``(params, batch)``).
    *args: Example arguments (arrays or ``jax.ShapeDtypeStruct``).
    warn: Issue a :class:`FullSizeResidualWarning` per residual found.

  Returns:
    The residuals found, largest first; empty when ``fn`` has no
    compressing layer.

  Example::

    lv.measure.full_size_residuals(loss, params, batch)
  """
  with layer_log.recording() as log:
    jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *_avals(args))
  return _full_size(fn, _avals(args), log, warn)


def _is_candidate(shape, source) -> bool:
  """Whether a residual could be a neighbour's full-size tensor.

  Arguments cost nothing extra (they are alive for the whole step), the
  library's own residuals are the compressed ones, and per-channel vectors
  are not activations.
  """
  return (len(shape) >= 2 and not source.startswith("from the argument")
          and _OWN_SOURCE not in source)


def _full_size(fn, args, log, warn):
  sizes = {math.prod(r.shape) for r in log
           if r.label not in _NOT_COMPRESSING}
  if not sizes:
    return ()
  found = []
  for shape, dtype, source in _saved_residuals(fn, args):
    if math.prod(shape) in sizes and _is_candidate(shape, source):
      found.append(Residual(shape, dtype.name,
                            math.prod(shape) * dtype.itemsize, source))
  found.sort(key=lambda r: -r.nbytes)
  if warn:
    for r in found:
      warnings.warn(
          f"a residual of {r.dtype}{list(r.shape)} ({r.nbytes} bytes) is "
          f"kept for the backward pass ({r.source}); it is as large as a "
          "compressed layer's input, so that layer's saving may be undone. "
          "Use lv.relu / lv.relu6 / lv.hard_swish / lv.silu / lv.gelu, "
          "lv.frozen_batch_norm or lv.bn_relu_conv next to compressed layers.",
          FullSizeResidualWarning, stacklevel=3)
  return tuple(found)


def memory_report(fn: Callable, *args, argnums: int | Sequence[int] = 0,
                  compile: bool = True,  # pylint: disable=redefined-builtin
                  warn: bool = False) -> MemoryReport:
  """Per-layer saved bytes (formula and measured) and whole-step figures.

  Works for any function that calls ``lv.compressed_conv`` /
  ``lv.compressed_dense`` (directly, through the Flax modules, or through
  per-layer rules): the layers are found while ``fn`` is traced.

  Args:
    fn: A loss function, e.g. ``loss(params, batch)``.
    *args: Example arguments (arrays or ``jax.ShapeDtypeStruct``).
    argnums: What to differentiate for XLA's step figures.
    compile: Compile ``jax.grad(fn, argnums)`` for XLA's figures.
    warn: Also warn about full-size residuals (:func:`full_size_residuals`).

  Returns:
    A :class:`MemoryReport`; ``print`` it for a table.

  Example::

    report = lv.measure.memory_report(loss, params, batch)
    print(report)
  """
  avals = _avals(args)
  with layer_log.recording() as log:
    vjp_bytes = measure.vjp_residual_bytes(fn, *avals)
  layers = tuple(LayerBytes(
      name=r.name, method=r.label, shape=r.shape,
      activation_bytes=math.prod(r.shape) * r.itemsize,
      formula_bytes=r.formula_bytes,
      measured_bytes=layer_residual_bytes(r)) for r in log)
  xla = (measure.xla_memory(jax.grad(fn, argnums=argnums), *avals)
         if compile else None)
  return MemoryReport(layers, vjp_bytes, xla,
                      _full_size(fn, avals, log, warn))
