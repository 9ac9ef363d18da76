"""Run names to layer settings, by asking the methods themselves.

The experiments name a run by a string (``--method vanilla,hosvd,asi``); the
compressed layers take settings (the keyword arguments of
:func:`lowrank_vjp.flax.conv_cls`, also accepted by
:func:`lowrank_vjp.compressed_conv`). Which method a name or a settings dict
means is decided by :func:`lowrank_vjp.methods.resolve` alone; the functions
here ask the resolved method what it is (its settings, its class, whether it
is stateful), so a new method needs no edit here:

* :func:`method_settings`: a name, ε and the user's extra settings to the
  layer settings, passing ε only to the methods that take it;
* :func:`method_name`, :func:`is_vanilla`, :func:`is_checkpoint`,
  :func:`uses_ranks`,
  :func:`carries_state`: what a run's settings are;
* :func:`run_label`: the name a run is reported under.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from lowrank_vjp import methods as lvm
from lowrank_vjp._src.methods import base as methods_base

VANILLA = "vanilla"
"""The run name of exact backprop (the layers run ``method="none"``)."""


def _method(settings: Any) -> lvm.Method:
  """The method that settings (None, a name, a dict or a value) mean."""
  if settings is None:
    return lvm.Vanilla()
  return lvm.resolve(settings)


def _takes(name: str, setting: str) -> bool:
  return setting in methods_base.settings_of(methods_base.method_class(name))


def run_names(methods: str) -> list[str]:
  """The runs of a comma-separated ``--method`` value.

  Args:
    methods: E.g. ``"vanilla,hosvd"``.

  Returns:
    The stripped, non-empty names, e.g. ``["vanilla", "hosvd"]``.

  Raises:
    SystemExit: if there are none.

  Example:
    >>> run_names("vanilla, hosvd")
    ['vanilla', 'hosvd']
  """
  names = [m.strip() for m in methods.split(",") if m.strip()]
  if not names:
    raise SystemExit("--method is empty")
  return names


def is_vanilla(name: str) -> bool:
  """Whether run ``name`` is exact backprop (``"vanilla"`` or ``"none"``)."""
  return methods_base.method_class(name) is lvm.Vanilla


def is_checkpoint(name: str) -> bool:
  """Whether run ``name`` is activation checkpointing (``"checkpoint"``)."""
  return methods_base.method_class(name) is lvm.Checkpoint


def method_settings(name: str, *, eps: float | None = None,
                    method_kwargs: Mapping[str, Any] | str | None = None
                    ) -> dict[str, Any]:
  """The settings of the compressed layers of run ``name``.

  ``eps`` (and ``on_overflow="ignore"``: the overflows are reported, and the
  rank controller acts on them) go only to the methods that take them
  (``"hosvd"`` and ``"svd"`` among the built-in ones). ASI takes ``ranks``
  / ``rank_fraction``, the quantizer ``bits`` / ``per_channel`` /
  ``stochastic``, the gradient filter ``radius``, and vanilla and
  checkpointing nothing; those come, for any method, from
  ``method_kwargs``.

  Args:
    name: ``"vanilla"`` (or ``"none"``) or a method of
      :func:`lowrank_vjp.flax.conv_cls` (``"hosvd"``, ``"svd"``, ``"asi"``,
      ``"quant"``, ``"gradfilter"``, ``"checkpoint"``, …).
    eps: Explained variance kept, for the methods that take it (their own
      default when None).
    method_kwargs: Further settings (a mapping or its JSON text), e.g.
      ``{"bits": 4}``; they override the ones set here.

  Returns:
    Keyword arguments for :func:`lowrank_vjp.flax.conv_cls`;
    ``{"method": "none"}`` for vanilla (whose layers still report their
    statistics).

  Example:
    >>> method_settings("hosvd", eps=0.8)
    {'method': 'hosvd', 'eps': 0.8, 'on_overflow': 'ignore'}
    >>> method_settings("quant", eps=0.8, method_kwargs='{"bits": 4}')
    {'method': 'quant', 'bits': 4}
  """
  if isinstance(method_kwargs, str):
    method_kwargs = json.loads(method_kwargs)
  extra = dict(method_kwargs or {})
  if is_vanilla(name):
    return {"method": "none"}
  settings: dict[str, Any] = {"method": name}
  if _takes(name, "eps"):
    if eps is not None:
      settings["eps"] = eps
    if _takes(name, "on_overflow"):
      settings["on_overflow"] = "ignore"
  return {**settings, **extra}


def settings_for(name: str, config) -> dict[str, Any]:
  """:func:`method_settings` with ``eps`` and ``method_kwargs`` of ``config``.

  Args:
    name: The run's method name.
    config: Anything with ``eps`` and ``method_kwargs`` (JSON text)
      attributes: a :class:`~lowrank_vjp.training.TrainConfig` or the
      scripts' parsed flags.

  Returns:
    The layer settings.
  """
  return method_settings(name, eps=config.eps,
                         method_kwargs=config.method_kwargs)


def method_name(settings: Any) -> str:
  """The method that layer ``settings`` run (``"none"`` for vanilla).

  Args:
    settings: A settings dict (``{"method": name, ...}``, as
      :func:`method_settings` returns) or a method value (as a fine-tuning
      plan holds), whose class ``name`` is its shorthand.

  Example:
    >>> method_name({"method": "svd", "eps": 0.9})
    'svd'
  """
  return _method(settings).label


def uses_ranks(settings: Any) -> bool:
  """Whether ``settings`` keep ε-ranks in static capacities (HOSVD, SVD).

  Those are the methods a :class:`lowrank_vjp.RankController` steers and
  whose run label shows ε. ``settings`` as for :func:`method_name`.
  """
  method = _method(settings)
  return isinstance(method, lvm.TuckerMethod) and not method.stateful


def carries_state(settings: Any) -> bool:
  """Whether ``settings`` carry factors from step to step (ASI).

  Their layers keep a ``lowrank_vjp.flax.ASI_COLLECTION`` collection that the
  training state holds (:func:`~lowrank_vjp.training.init_asi_state`).
  ``settings`` as for :func:`method_name`.
  """
  return _method(settings).stateful


def run_label(name: str, settings: Mapping[str, Any]) -> str:
  """The name run ``name`` is reported under, e.g. ``"hosvd(eps=0.8)"``.

  Args:
    name: The run's method name.
    settings: Its layer settings, from :func:`method_settings`.

  Returns:
    ``"vanilla"``, or ``name`` followed by its settings other than the
    method and ``on_overflow``.

  Example:
    >>> run_label("hosvd", method_settings("hosvd", eps=0.8))
    'hosvd(eps=0.8)'
  """
  if is_vanilla(name):
    return VANILLA
  # Shown only where it decides something (user settings may add it).
  shown = {k: v for k, v in settings.items()
           if k not in ("method", "on_overflow")
           and (k != "eps" or _takes(name, "eps"))}
  inner = ",".join(f"{k}={v}" for k, v in shown.items())
  return f"{name}({inner})" if inner else name


def unsupported(settings: Mapping[str, Any]) -> str | None:
  """Why ``settings`` cannot run through the Flax modules, or None.

  Example:
    >>> unsupported({"method": "hosvd"}) is None
    True
  """
  from lowrank_vjp import flax as lvf  # pylint: disable=g-import-not-at-top
  try:
    lvf.conv_cls(**settings)
  except (TypeError, ValueError) as e:
    return f"not available in lowrank_vjp.flax: {e}"
  return None
