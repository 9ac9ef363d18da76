"""The method protocol: what a compression method is, and how one is named.

A method is a frozen, hashable, keyword-only dataclass whose fields are its
settings. It decides what an op saves of its input ``lhs`` for the backward
pass. A user's method needs two functions::

  @dataclasses.dataclass(frozen=True)
  class Bf16(lv.methods.Method):
    def compress(self, x):                 # -> the pytree saved
      return x.astype(jnp.bfloat16)
    def decompress(self, residual, like):  # like: jax.ShapeDtypeStruct of x
      return residual.astype(like.dtype)

and then works in every drop-in, Flax module and fine-tuning rule, with the
exact input gradient and the weight gradient taken at ``decompress(...)``.
The optional hooks below (:meth:`Method.compress_for`,
:meth:`Method.weight_grad`, :meth:`Method.input_grad`,
:meth:`Method.cotangent`, :meth:`Method.rebuild`, :meth:`Method.init_state`,
:meth:`Method.apply`, :meth:`Method.with_capacity`, :meth:`Method.check_op`)
are how the built-in methods get their fast paths, state and statistics.

Subclasses with a ``name`` are registered under it, so that the string
shorthand (``method="hosvd", eps=0.9``) resolves in one place,
:func:`resolve`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src import schedule
from lowrank_vjp._src.ops import vjp

_REGISTRY: dict[str, type[Method]] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
  """Base class of compression methods (see the module docstring).

  Class attributes a subclass may set:
    name: Shorthand that :func:`resolve` accepts (``"hosvd"``); also the
      ``method`` field of the layer's :class:`CompressionStats`. Defaults to
      the class name in lower case (not registered).
    aliases: Further shorthands.
    stateful: True when the method carries state between steps (ASI): the
      op is then called with a state and returns the new one.
    per_shard: Whether a batch-sharded input is compressed per device (each
      device decomposes its own shard); False runs the op as it is.
  """

  name: ClassVar[str | None] = None
  aliases: ClassVar[tuple[str, ...]] = ()
  stateful: ClassVar[bool] = False
  per_shard: ClassVar[bool] = True

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    name = cls.__dict__.get("name")
    if name:
      for key in (name,) + tuple(cls.__dict__.get("aliases", ())):
        _REGISTRY[key] = cls

  # ------------------------------------------ what a user's method writes

  def compress(self, x: jax.Array) -> Any:
    """The pytree of arrays saved for the backward pass instead of ``x``."""
    raise NotImplementedError(
        f"{type(self).__name__} must define compress(self, x) (and "
        "decompress(self, residual, like)), or override compress_for.")

  def decompress(self, residual: Any, like: jax.ShapeDtypeStruct
                 ) -> jax.Array:
    """The activation the weight gradient is taken at, rebuilt.

    Args:
      residual: What :meth:`compress` returned.
      like: Shape and dtype of the original ``x``.
    """
    raise NotImplementedError(
        f"{type(self).__name__} must define decompress(self, residual, like).")

  # ---------------------------------------------------- optional hooks

  @property
  def label(self) -> str:
    """The name statistics and tables use."""
    return type(self).name or type(self).__name__.lower()

  def check_op(self, op) -> None:
    """Raises ``ValueError`` (at trace time) for an op this method can't take."""
    del op

  def init_state(self, op) -> Any:
    """Initial state for ``op`` (stateful methods only; None otherwise)."""
    del op

  def check_state(self, op, state: Any) -> None:
    """Raises ``ValueError`` (at trace time) for a state that does not fit."""
    del op, state

  def compress_for(self, op, x: jax.Array, state: Any
                   ) -> tuple[Any, stats_lib.CompressionStats, Any]:
    """``(residual, stats, new_state)`` for ``x``, the input of ``op``.

    The default calls :meth:`compress` and reports the residual's bytes.
    """
    residual = self.compress(x)
    nbytes = sum(math.prod(np.shape(leaf)) * jnp.dtype(leaf.dtype).itemsize
                 for leaf in jax.tree_util.tree_leaves(residual))
    return (residual, stats_lib.uncompressed(x.shape, x.dtype, self.label,
                                             nbytes), state)

  def cotangent(self, op, g: jax.Array) -> Any:
    """What :meth:`input_grad` and :meth:`weight_grad` read of ``g``.

    ``g`` itself by default. A method whose gradients both read a reduction
    of the output gradient (gradient filtering's patch averages) returns it
    here, so that the full ``g`` dies once it is computed.
    """
    del op
    return g

  def input_grad(self, op, residual: Any, rhs: jax.Array, g: jax.Array
                 ) -> jax.Array:
    """``d lhs``; exact by default (the op's transpose, needing only rhs).

    ``g`` is :meth:`cotangent`'s; ``rhs`` is already pinned to the backward
    pass, after :meth:`weight_grad`.
    """
    del residual
    return op.input_grad(rhs, g)

  def rebuild(self, op, residual: Any) -> jax.Array:
    """``op``'s input rebuilt from the residual (:meth:`decompress` by default).

    Methods whose decoding needs the op (its channel axis) override this
    rather than :meth:`decompress`; layers other than contractions
    (:func:`lowrank_vjp.batch_norm`) rebuild their saved activation with it.
    """
    return self.decompress(residual, op.lhs_aval())

  def weight_grad(self, op, residual: Any, g: jax.Array) -> jax.Array:
    """``d rhs`` at the rebuilt input (rebuilt only once ``g`` exists).

    ``g`` is :meth:`cotangent`'s.
    """
    residual = jax.tree_util.tree_map(lambda r: schedule.after(r, g),
                                      residual)
    return op.weight_grad(self.rebuild(op, residual), g)

  def apply(self, op, lhs: jax.Array, rhs: jax.Array, state: Any = None
            ) -> tuple[jax.Array, stats_lib.CompressionStats, Any]:
    """``(y, stats, new_state)``: the op run through the compressed VJP."""
    y, stats, new_state = vjp.compressed_apply(op, self, lhs, rhs, state)
    self.report(stats)
    return y, stats, new_state

  def report(self, stats: stats_lib.CompressionStats) -> None:
    """Reacts to one call's statistics (traced); nothing by default."""
    del stats

  def with_capacity(self, capacity: tuple[int | None, ...]) -> Method:
    """This method with per-axis rank capacities set (rank controller).

    Methods without ranks return themselves.
    """
    del capacity
    return self


# ------------------------------------------------------------- resolving


def known() -> tuple[str, ...]:
  """Every registered shorthand."""
  return tuple(sorted(_REGISTRY))


def method_class(name: str) -> type[Method]:
  """The class registered under ``name``.

  Raises:
    ValueError: for an unknown name.
  """
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(f"method must be a lowrank_vjp.methods.Method or one of "
                     f"{list(known())}; got {name!r}.")
  return _REGISTRY[name]


def settings_of(cls: type[Method]) -> tuple[str, ...]:
  """The setting names (dataclass fields) a method class takes."""
  return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def resolve(method: Method | str | Mapping[str, Any] = "hosvd",
            **settings: Any) -> Method:
  """A :class:`Method` from a value, a shorthand string or a settings dict.

  Args:
    method: A :class:`Method` (returned as is), a registered name
      (``"hosvd"``, ``"svd"``, ``"asi"``, ``"quant"``, ``"gradfilter"``,
      ``"checkpoint"``, ``"none"``), or a dict ``{"method": name, **settings}``.
    **settings: The method's settings, with a name.

  Returns:
    The method.

  Raises:
    TypeError: for a setting the method does not take (naming both), or
      settings given together with a :class:`Method` value.
    ValueError: for an unknown name or a setting out of range.

  Example::

    lv.methods.resolve("hosvd", eps=0.8)     # Hosvd(eps=0.8, ...)
    lv.methods.resolve("quant", eps=0.8)     # TypeError: quant takes no eps
  """
  if isinstance(method, Mapping):
    settings = {**dict(method), **settings}
    method = settings.pop("method", "hosvd")
  if isinstance(method, Method):
    if settings:
      raise TypeError(
          f"settings {sorted(settings)} given with the method value "
          f"{method!r}; set them on the method instead, e.g. "
          f"dataclasses.replace(method, {next(iter(settings))}=...).")
    return method
  cls = method_class(method)
  allowed = settings_of(cls)
  unknown = sorted(set(settings) - set(allowed))
  if unknown:
    raise TypeError(
        f"method {method!r} takes no setting {unknown[0]!r}"
        + (f" (nor {unknown[1:]})" if len(unknown) > 1 else "")
        + f"; its settings are {list(allowed) or 'none'}.")
  return cls(**settings)


EXACT_METHODS = ("none", "checkpoint")
"""Methods that, asked to keep an activation, keep it exactly."""


def resolve_stateless(method, where: str) -> Method | None:
  """The method a non-contraction layer keeps its activation with.

  For :func:`lowrank_vjp.batch_norm` and
  :func:`lowrank_vjp.dot_product_attention`: None (or ``"exact"``,
  ``"none"``, ``"checkpoint"``) means the exact activation.

  Raises:
    ValueError: for a stateful method, naming ``where``.
  """
  if method is None or method == "exact":
    return None
  method = resolve(method)
  if method.label in EXACT_METHODS:
    return None
  if method.stateful:
    raise ValueError(
        f"{where}: method {method.label!r} is stateful; this layer keeps "
        "its activation with a stateless method (for example 'quant' or "
        "'hosvd'), or exactly with method=None.")
  return method


# ------------------------------------------------------------ validation


def concrete_number(name: str, value, owner: str) -> float:
  """``value`` as a Python float, accepting concrete 0-d arrays.

  Raises:
    ValueError: for bools, non-numbers, traced values and NaN.
  """
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
    if isinstance(value, jax.core.Tracer):
      raise ValueError(f"{owner}: {name} must be a concrete number (a "
                       f"static setting), got a traced value {value!r}.")
    value = np.asarray(value).item()
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{owner}: {name} must be a real number, got "
                     f"{value!r}.")
  value = float(value)
  if math.isnan(value):
    raise ValueError(f"{owner}: {name} must be a real number, got nan.")
  return value


def fraction(name: str, value, owner: str) -> float:
  """A number in ``(0, 1]``, or ``ValueError`` naming it."""
  v = concrete_number(name, value, owner)
  if not 0.0 < v <= 1.0:
    raise ValueError(f"{owner}: {name} must be a real number in (0, 1], got "
                     f"{value!r}.")
  return v


def integer(name: str, value, owner: str, *, minimum: int = 1,
            choices: tuple[int, ...] | None = None) -> int:
  """An int (not a bool, not a float), or ``ValueError`` naming it."""
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0 and (
      not isinstance(value, jax.core.Tracer)) and np.issubdtype(
          np.asarray(value).dtype, np.integer):
    value = int(np.asarray(value).item())
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    want = f"one of {choices}" if choices else f"an int >= {minimum}"
    raise ValueError(f"{owner}: {name} must be {want}, got {value!r}.")
  value = int(value)
  if choices is not None and value not in choices:
    raise ValueError(f"{owner}: {name} must be one of {choices}, got "
                     f"{value!r}.")
  if value < minimum:
    raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got "
                     f"{value!r}.")
  return value


def boolean(name: str, value, owner: str) -> bool:
  """True or False (NumPy bools too), or ``ValueError`` naming it."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{owner}: {name} must be True or False, got "
                     f"{value!r}.")
  return bool(value)


def choice(name: str, value, allowed: tuple[str, ...], owner: str) -> str:
  """One of ``allowed``, or ``ValueError`` naming it."""
  if value not in allowed:
    raise ValueError(f"{owner}: {name} must be one of {allowed}, got "
                     f"{value!r}.")
  return value


def set_field(obj, name: str, value) -> None:
  """Normalises a field of a frozen dataclass in ``__post_init__``."""
  object.__setattr__(obj, name, value)
