"""Per-step figures from the layers' statistics, kept as JSON lines.

One JSON object per line and step (``metrics.jsonl``), flushed as it is
written, so an interrupted run leaves every finished step on disk and a
resumed one drops the rows past its checkpoint (:func:`read_metrics`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

import lowrank_vjp as lv

MiB = float(2**20)


def stats_row(stats: Mapping[str, lv.CompressionStats]) -> dict[str, Any]:
  """Per-step figures from the layers' concrete statistics.

  Args:
    stats: ``{module path: CompressionStats}`` (host values), as the train
      step's ``metrics["stats"]``.

  Returns:
    ``activation_memory_analytic_mib`` (the papers' count at the ranks ε
    needed), ``activation_memory_vanilla_mib`` (the full activations),
    ``activation_memory_capacity_mib`` (what the static shapes hold),
    all summed over every call of stacked stats (``nn.scan``), ``ranks``
    (``{path: [rank per mode]}``, the largest over such calls) and
    ``overflow_layers`` (how many layers needed more than their capacity).
  """
  analytic = sum(s.analytic_nbytes() for s in stats.values())
  vanilla = sum(s.activation_nbytes * s.calls for s in stats.values())
  capacity = sum(s.residual_nbytes * s.calls for s in stats.values())
  ranks = {p: [int(k) for k in np.asarray(s.needed_ranks).reshape(
      -1, len(s.shape)).max(0)] for p, s in stats.items()}
  overflow = sum(bool(np.any(np.asarray(s.overflow))) for s in stats.values())
  return {"activation_memory_analytic_mib": analytic / MiB,
          "activation_memory_vanilla_mib": vanilla / MiB,
          "activation_memory_capacity_mib": capacity / MiB,
          "ranks": ranks, "overflow_layers": overflow}


def check_finite(loss: float, what: str = "") -> float:
  """Returns ``loss``; raises ``FloatingPointError`` if it is not finite.

  Args:
    loss: A concrete loss.
    what: Where it comes from, for the message (e.g. ``"[hosvd] at step
      3"``).
  """
  if not math.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss}" + (f" {what}" if what
                                                          else ""))
  return loss


def read_metrics(path: str, upto_step: int) -> list[dict]:
  """The rows of ``path`` with ``row["step"] <= upto_step`` (none if absent)."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if row["step"] <= upto_step:
        rows.append(row)
  return rows


def write_metrics(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
  """Writes ``rows`` to ``path``, one JSON line each (replacing the file)."""
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


class MetricsWriter:
  """Appends one JSON line per row to a file, flushed after each.

  Example:
    >>> with MetricsWriter("/tmp/metrics.jsonl") as w:  # doctest: +SKIP
    ...   w.write({"step": 1, "loss": 2.3})
  """

  def __init__(self, path: str, mode: str = "a"):
    self.path = path
    self._file = open(path, mode)  # noqa: SIM115  closed by close()

  def write(self, row: Mapping[str, Any]) -> None:
    """Appends ``row`` as one line and flushes it to disk."""
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def close(self) -> None:
    """Closes the file."""
    self._file.close()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
