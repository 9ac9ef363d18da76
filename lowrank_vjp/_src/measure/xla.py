"""Measuring what a training step keeps: XLA's figures and per-layer tables."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import numpy as np

from lowrank_vjp._src.tensor import tucker as residuals

MiB = float(2**20)


@dataclasses.dataclass(frozen=True)
class XlaMemory:
  """Byte counts from ``jax.jit(fn).lower(...).compile().memory_analysis()``.

  Compare programs by :attr:`peak_bytes` (``argument + output + temp -
  alias``), not by ``temp_bytes`` alone: where the residuals kept between
  the forward and the backward pass live depends on donation. Without
  ``donate_argnums`` XLA may place intermediates in the freshly allocated
  output buffers, so temp shrinks while the peak does not (seen: 54.5 MiB of
  temp donated, 0.4 MiB not, for the same step). Compare only programs built
  the same way, donation included. On the CPU the compiler's own
  ``peak_memory_in_bytes`` counts only arguments and outputs, hence the
  estimate.

  Attributes:
    argument_bytes: Inputs (parameters, batch, optimizer state).
    output_bytes: Outputs.
    temp_bytes: Scratch space, activations saved for the backward included.
    alias_bytes: Outputs that reuse donated inputs.
    device: The device kind the program was compiled for.
  """

  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  device: str

  @property
  def peak_bytes(self) -> int:
    """Estimated peak: ``argument + output + temp - alias``."""
    return (self.argument_bytes + self.output_bytes + self.temp_bytes
            - self.alias_bytes)

  def __str__(self) -> str:
    return (f"XLA ({self.device}): temp {self.temp_bytes / MiB:.2f} MiB, "
            f"arguments {self.argument_bytes / MiB:.2f} MiB, outputs "
            f"{self.output_bytes / MiB:.2f} MiB, aliased "
            f"{self.alias_bytes / MiB:.2f} MiB, estimated peak "
            f"{self.peak_bytes / MiB:.2f} MiB")


def xla_memory(fn: Callable, *args, **kwargs) -> XlaMemory:
  """Compiles ``fn`` for ``args`` and returns XLA's memory figures.

  Args:
    fn: A function, or an already-jitted one (its own ``donate_argnums`` and
      shardings are kept). It is not run.
    *args: Example arguments (arrays or ``jax.ShapeDtypeStruct``).
    **kwargs: Keyword arguments for ``fn``.

  Returns:
    An :class:`XlaMemory`.

  Example::

    step = jax.jit(jax.grad(loss))
    print(lv.measure.xla_memory(step, params, batch))
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  compiled = jitted.lower(*args, **kwargs).compile()
  m = compiled.memory_analysis()
  devices = jax.devices()
  return XlaMemory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                   int(m.temp_size_in_bytes), int(m.alias_size_in_bytes),
                   devices[0].device_kind if devices else "unknown")


def vjp_residual_bytes(fn: Callable, *args) -> int:
  """Bytes held by the VJP closure of ``fn`` at ``args`` (jaxpr level).

  These are the residuals autodiff keeps between the forward and the backward
  pass before XLA optimises the program (parameters that the backward needs
  included). Nothing is computed: shapes come from ``jax.eval_shape``.

  Args:
    fn: Function to differentiate.
    *args: Example arguments.

  Returns:
    Total bytes of the closure's array leaves.
  """
  closure = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
  return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree_util.tree_leaves(closure))


@dataclasses.dataclass(frozen=True)
class LayerMemory:
  """One row of :func:`layer_table`.

  Attributes:
    name: Layer name (path in the model).
    method: Compression method.
    shape: Activation shape.
    activation_bytes: What vanilla backprop would save for this input.
    analytic_bytes: The paper's count at the ranks ε needed this step:
      ``(Π K + Σ I·K) · itemsize`` (HOSVD) or ``(B·K + K·CHW) · itemsize``
      (batch SVD); for several steps, the largest.
    saved_bytes: Bytes of the arrays this layer actually saves (the
      residual at its static capacity).
    needed_ranks: Ranks ε needed (largest over steps if stacked).
    capacity: Static rank capacity per axis.
  """

  name: str
  method: str
  shape: tuple[int, ...]
  activation_bytes: int
  analytic_bytes: int
  saved_bytes: int
  needed_ranks: tuple[int, ...]
  capacity: tuple[int | None, ...]


def layer_table(stats: Mapping[str, residuals.CompressionStats]
                ) -> list[LayerMemory]:
  """Per-layer saved bytes from the statistics the layers report.

  Args:
    stats: Layer name to :class:`CompressionStats` (concrete values, e.g.
      from ``CompressedConv.with_stats`` or the Flax ``"compression"``
      collection). Stats stacked over steps (leading axes) are reduced by max.

  Returns:
    One :class:`LayerMemory` per layer, in the mapping's order.
  """
  rows = []
  for name, s in stats.items():
    needed = np.asarray(jax.device_get(s.needed_ranks)).reshape(
        -1, len(s.shape)).max(axis=0)
    rows.append(LayerMemory(
        name=name, method=s.method, shape=tuple(s.shape),
        activation_bytes=s.activation_nbytes,
        analytic_bytes=s.analytic_nbytes(), saved_bytes=s.residual_nbytes,
        needed_ranks=tuple(int(k) for k in needed),
        capacity=tuple(s.capacity)))
  return rows


def format_table(rows: list[LayerMemory],
                 xla: XlaMemory | None = None) -> str:
  """Renders :func:`layer_table` rows (and XLA's figures) as plain text."""
  head = (f"{'layer':<28} {'method':<6} {'shape':<20} {'vanilla MiB':>11} "
          f"{'analytic MiB':>12} {'saved MiB':>10} {'ranks needed / capacity'}")
  lines = [head, "-" * len(head)]
  for r in rows:
    caps = ",".join("-" if c is None else str(c) for c in r.capacity)
    lines.append(
        f"{r.name:<28} {r.method:<6} {str(r.shape):<20} "
        f"{r.activation_bytes / MiB:>11.3f} {r.analytic_bytes / MiB:>12.3f} "
        f"{r.saved_bytes / MiB:>10.3f} "
        f"{','.join(map(str, r.needed_ranks))} / {caps}")
  total = lambda f: sum(f(r) for r in rows) / MiB
  lines.append(
      f"{'total':<28} {'':<6} {'':<20} "
      f"{total(lambda r: r.activation_bytes):>11.3f} "
      f"{total(lambda r: r.analytic_bytes):>12.3f} "
      f"{total(lambda r: r.saved_bytes):>10.3f}")
  if xla is not None:
    lines.append(str(xla))
  return "\n".join(lines)


def temp_bytes_per_layer(build: Callable[[int], tuple[Callable, tuple]],
                         depths=(4, 8, 12, 16)) -> tuple[float, list[int]]:
  """XLA temp bytes added per layer: the slope over networks of ``depths``.

  The intercept (scratch space of one layer's forward or backward) cancels,
  so the slope is what each additional layer keeps for the backward pass —
  the regression figure of docs/memory.md.

  Args:
    build: ``depth -> (step_fn, args)``; ``step_fn`` is jitted if needed.
    depths: Network depths to compile (at least two).

  Returns:
    ``(slope, temps)``: least-squares bytes per layer and the temp bytes at
    each depth.
  """
  temps = []
  for depth in depths:
    fn, args = build(depth)
    temps.append(xla_memory(fn, *args).temp_bytes)
  slope = float(np.polyfit(np.asarray(depths, float), np.asarray(temps, float),
                           1)[0])
  return slope, temps
