"""A trace-time log of the compressed layers a function calls.

``compressed_conv`` / ``compressed_dense`` call :func:`record` each time they
are traced. Outside :func:`recording` that is a no-op; inside, each call
appends a :class:`LayerRecord` (static information only: method, shapes,
spec, the residual's formula bytes), which is how the memory report finds
the layers of an arbitrary model without the model's cooperation.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

MODULES = ("CompressedConvGeneralDilated", "CompressedDotGeneral")
"""Class names of the Linen modules (lowrank_vjp.flax): the one list."""

_KINDS = {"conv": "conv", "dot": "dense"}

_ACTIVE: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "lowrank_vjp_layer_log", default=None)


@dataclasses.dataclass(frozen=True)
class LayerRecord:
  """One traced call of a compressed layer.

  Attributes:
    name: The Flax module path when called inside a Linen module (with
      ``"#<call>"`` appended from its second call), else
      ``"<kind>_<index>"``.
    kind: ``"conv"`` or ``"dense"``.
    method: The layer's :class:`lowrank_vjp.methods.Method`.
    spec: Its ``ConvSpec`` / ``DotSpec``.
    label: The method's name in statistics (``"hosvd"``, …).
    shape: The activation's shape.
    itemsize: Bytes per activation element.
    formula_bytes: What the method's formula says the residual occupies.
  """

  name: str
  kind: str
  method: Any
  spec: Any
  label: str
  shape: tuple[int, ...]
  itemsize: int
  formula_bytes: int


def _module_path() -> str | None:
  try:
    from flax.linen import module as linen_module  # pylint: disable=g-import-not-at-top
    stack = linen_module._context.module_stack  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except  # Flax absent or moved.
    return None
  for module in reversed(stack):
    # The Linen modules are the layers' own sub-modules: name the layer instead.
    if module is None or type(module).__name__ in MODULES:
      continue
    path = getattr(module, "path", None)
    if path:
      return "/".join(str(p) for p in path)
  return None


def record(op, method, stats) -> None:
  """Logs one layer call if a :func:`recording` is open.

  Only convolutions and ``dot_general`` s are logged (a decorated function
  of another form has no layer to report).
  """
  log = _ACTIVE.get()
  if log is None or op.kind not in _KINDS:
    return
  kind = _KINDS[op.kind]
  name = _module_path()
  if name is None:
    name = f"{kind}_{sum(r.kind == kind for r in log)}"
  else:  # a layer called again: "path#1", "path#2", ...
    calls = sum(r.name.split("#")[0] == name for r in log)
    name = f"{name}#{calls}" if calls else name
  log.append(LayerRecord(
      name=name, kind=kind, method=method, spec=op, label=stats.method,
      shape=tuple(stats.shape), itemsize=int(stats.itemsize),
      formula_bytes=int(stats.residual_nbytes)))


@contextlib.contextmanager
def recording():
  """Collects :class:`LayerRecord` s of the layers traced inside the block.

  Yields:
    The list the records are appended to.
  """
  log: list[LayerRecord] = []
  token = _ACTIVE.set(log)
  try:
    yield log
  finally:
    _ACTIVE.reset(token)
