"""Fine-tuning rules for Flax NNX models: :func:`apply`, :func:`stats`.

The rules and their semantics are :mod:`lowrank_vjp.rules`' (first match
wins; a rule that matches nothing is an error; a BatchNorm trains with the
convolution called right before it); what differs is how a plan reaches the
model. A Linen model is intercepted at every ``apply``; an NNX model is a
graph of mutable Python objects, so :func:`apply` changes it once, in
place, through the hooks NNX layers offer:

* a compressed ``nnx.Conv`` / ``nnx.Linear`` / ``nnx.LinearGeneral`` gets a
  :class:`~lowrank_vjp._src.nnx.layers.Contraction` as its
  ``conv_general_dilated`` / ``dot_general`` (its kernel and bias stay
  where they are);
* a trained BatchNorm becomes a
  :class:`~lowrank_vjp._src.nnx.layers.TrainedBatchNorm` and a frozen one a
  :class:`~lowrank_vjp._src.nnx.layers.FrozenBatchNorm` (the same object
  and variables, its class switched).

Calling :func:`apply` again first undoes the previous plan, so a model can
be re-planned; :func:`restore` only undoes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_vjp._src import stats as stats_lib
from lowrank_vjp._src.finetune import rules as rules_lib
from lowrank_vjp._src.nnx import layers, variables

_HOOKS = ((nnx.Conv, "conv", "conv_general_dilated"),
          (nnx.Linear, "dense", "dot_general"),
          (nnx.LinearGeneral, "dense", "dot_general"))
_PATH_ATTR = "_lowrank_discover_path"
_BN_ATTRS = ("lowrank_method", "lowrank_path", "lowrank_stats")


def _join(path) -> str:
  return "/".join(str(p) for p in path)


def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
  """``{path: module}`` of the model's modules, ours excluded."""
  return {_join(p): m for p, m in nnx.iter_graph(model)
          if isinstance(m, nnx.Module)
          and not isinstance(m, layers.Contraction)}


def _kind(module: nnx.Module) -> tuple[str, str | None]:
  """``(kind, hook attribute)`` of a module."""
  for cls, kind, attr in _HOOKS:
    if isinstance(module, cls) and hasattr(module, attr):
      return kind, attr
  if isinstance(module, nnx.BatchNorm):
    return "batch_norm", None
  return "other", None


def _natural(path: str):
  return [(0, int(t), "") if t.isdigit() else (1, 0, t)
          for t in path.split("/")]


_RECORDING: dict[type, type] = {}


def _recording(cls: type) -> type:
  """A subclass of ``cls`` whose ``__call__`` reports the call first."""
  if cls not in _RECORDING:
    def __call__(self, *args, **kwargs):
      _Recorder.current.append((getattr(self, _PATH_ATTR), args))
      return cls.__call__(self, *args, **kwargs)
    _RECORDING[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
  return _RECORDING[cls]


class _Recorder:
  current: list = []


def _call_order(model: nnx.Module, modules: dict[str, nnx.Module], args,
                kwargs) -> list[tuple[str, tuple]]:
  """``[(path, call args)]`` of one abstract call of ``model`` (no FLOPs).

  Each module's class is switched to a recording subclass for the trace,
  which runs on a copy of the model (``nnx.split`` / ``nnx.merge`` under
  ``jax.eval_shape``), so the model itself is not touched by the call.
  """
  saved = {}
  try:
    for path, module in modules.items():
      saved[path] = type(module)
      setattr(module, _PATH_ATTR, nnx.static(path))
      module.__class__ = _recording(type(module))
    graphdef, state = nnx.split(model)
    _Recorder.current = []
    _traced(jax.eval_shape, lambda s, a, k: nnx.merge(graphdef, s)(*a, **k),
            state, args, kwargs)
    return list(_Recorder.current)
  finally:
    _Recorder.current = []
    for path, cls in saved.items():
      module = modules[path]
      module.__class__ = cls
      if hasattr(module, _PATH_ATTR):
        delattr(module, _PATH_ATTR)


def discover(model: nnx.Module, *args, **kwargs) -> tuple[rules_lib.Layer,
                                                          ...]:
  """The layers of an NNX model, as :func:`lowrank_vjp.rules.discover`.

  Args:
    model: An NNX module.
    *args: An example input of ``model(...)`` (arrays or
      ``jax.ShapeDtypeStruct``). With one, the layers come in the order they
      are first called, with their input shapes (one abstract call, on a
      copy). Without, they come in path order (numbers compared as numbers:
      ``features/2`` before ``features/10``), with no shapes.
    **kwargs: Keyword arguments of that call (``train=True``).

  Returns:
    One :class:`lowrank_vjp.rules.Layer` per module path (the root only
    when it owns parameters itself).
  """
  modules = _modules(model)
  params: dict[str, list[str]] = {}
  for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path and isinstance(path[-1], str):
      params.setdefault(_join(path[:-1]), []).append(path[-1])
  if args or kwargs:
    order = []
    seen = {}
    for path, call_args in _call_order(model, modules, args, kwargs):
      if path not in seen:
        x = call_args[0] if call_args else None
        seen[path] = (tuple(x.shape) if hasattr(x, "shape") else None,
                      x.dtype.itemsize if hasattr(x, "dtype") else 0)
        order.append(path)
    order += sorted((p for p in modules if p not in seen), key=_natural)
  else:
    seen = {}
    order = sorted(modules, key=_natural)
  out = []
  for i, path in enumerate(order):
    if not path and not params.get(path):
      continue
    module = modules[path]
    shape, itemsize = seen.get(path, (None, 0))
    out.append(rules_lib.Layer(path, _kind(module)[0],
                               type(module).__name__, i, shape, itemsize,
                               tuple(params.get(path, ()))))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Trained:
  """An NNX filter: the parameters of the given module paths.

  Hashable, so it can be a static argument (``nnx.DiffState(0, wrt)``,
  ``nnx.Optimizer(model, tx, wrt=wrt)``).
  """

  paths: frozenset[str]

  def __call__(self, path, value) -> bool:
    return (isinstance(value, nnx.Param)
            and _join(path[:-1]) in self.paths)


@dataclasses.dataclass(frozen=True)
class Plan(rules_lib.Plan):
  """What :func:`apply` did to an NNX model.

  The fields are :class:`lowrank_vjp.rules.Plan`'s (``compressed``,
  ``trainable``, ``train_bn``, ``bn_methods``; ``describe()`` prints them);
  :attr:`wrt` is the filter of the trained parameters. The Linen-only
  methods (``intercept``, ``split``, ``merge``) raise: an NNX model is
  changed in place, and differentiated with ``nnx.DiffState(0, plan.wrt)``.
  """

  @property
  def wrt(self) -> Trained:
    """Filter of the trained parameters (:class:`Trained`)."""
    return Trained(frozenset(self.trainable))

  def intercept(self):
    raise TypeError("an NNX plan is applied in place by lowrank_vjp.nnx."
                    "apply; there is nothing to intercept.")

  def split(self, variables):
    raise TypeError("an NNX plan has no variables to split: differentiate "
                    "with nnx.DiffState(0, plan.wrt) instead.")


def restore(model: nnx.Module) -> None:
  """Undoes :func:`apply`: the layers' own contractions and BatchNorms."""
  for _, module in nnx.iter_graph(model):
    if not isinstance(module, nnx.Module):
      continue
    attr = _kind(module)[1]
    hook = getattr(module, attr, None) if attr else None
    if isinstance(hook, layers.Contraction):
      setattr(module, attr, nnx.static(hook.original))
    if isinstance(module, (layers.TrainedBatchNorm, layers.FrozenBatchNorm)):
      module.__class__ = nnx.BatchNorm
      for name in _BN_ATTRS:
        if hasattr(module, name):
          delattr(module, name)


def _switch_bn(module: nnx.Module, path: str, cls: type, method=None):
  if type(module) not in (nnx.BatchNorm, layers.TrainedBatchNorm,
                          layers.FrozenBatchNorm):
    raise ValueError(
        f"{path}: the plan must "
        f"{'train' if cls is layers.TrainedBatchNorm else 'freeze'} "
        f"this BatchNorm, but it is a {type(module).__name__}, not an "
        "nnx.BatchNorm; give it a rule of its own, or freeze_bn=False.")
  module.__class__ = cls
  module.lowrank_path = nnx.static(path)
  if cls is layers.TrainedBatchNorm:
    module.lowrank_method = nnx.static(method)
    module.lowrank_stats = variables.Compression(None)


def apply(model: nnx.Module, rules: Sequence[rules_lib.Rule], *args,
          freeze_bn: bool = True, allow_unused: bool = False,
          **kwargs) -> Plan:
  """Applies fine-tuning rules to an NNX model, in place.

  Each layer takes the first rule whose pattern matches its path (the
  attribute names joined by ``/``: ``"features/17/conv/1/0"``,
  ``"layer4/1/conv2"``), as in :func:`lowrank_vjp.rules.make_plan`:
  matched ``nnx.Conv`` / ``nnx.Linear`` layers with settings get the
  compressed contraction; BatchNorms follow ``train_bn`` (the others, with
  ``freeze_bn``, use their running averages whatever the model passes).

  Args:
    model: An NNX module; changed in place (an earlier plan is undone
      first).
    rules: :class:`lowrank_vjp.rules.Rule` s, first match wins.
    *args: Optional example input of ``model(...)``: the layers are then
      ordered by call (what "the BatchNorm after a convolution" means), and
      the compressed layers' statistics and states are created at their
      shapes, so that the model's state keeps one structure from the first
      step on (no retrace under ``nnx.jit``). Without it, layers are ordered
      by path and the records are created at the first call.
    freeze_bn: Force every BatchNorm not trained to its running averages.
    allow_unused: Accept rules that match no layer.
    **kwargs: Keyword arguments of the example call (``train=True``).

  Returns:
    The :class:`Plan`; differentiate ``nnx.DiffState(0, plan.wrt)``.

  Raises:
    ValueError: for a rule that matches nothing, a rule with settings that
      matches no convolution or dense layer, or a BatchNorm to switch that
      is not an ``nnx.BatchNorm``.

  Example::

    model = MyNnxCnn(rngs=nnx.Rngs(0))
    plan = lv.nnx.apply(model, [lvr.Rule(r"conv[34]", {"method": "hosvd",
                                                       "eps": 0.9}),
                                lvr.Rule("head")], x)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(
        0, plan.wrt))(model, x, y)
    lv.nnx.stats(model)      # {"conv3": CompressionStats, "conv4": ...}
  """
  restore(model)
  found = discover(model, *args, **kwargs)
  p = rules_lib.make_plan(found, rules, freeze_bn=freeze_bn,
                          allow_unused=allow_unused)
  modules = _modules(model)
  for path, method in p.compressed:
    module = modules[path]
    kind, attr = _kind(module)
    setattr(module, attr, nnx.data(layers.Contraction(
        kind, method, path, getattr(module, attr))))
  bn_methods = dict(p.bn_methods)
  for layer in found:
    if layer.kind != "batch_norm":
      continue
    module = modules[layer.path]
    if layer.path in bn_methods:
      _switch_bn(module, layer.path, layers.TrainedBatchNorm,
                 bn_methods[layer.path])
    elif layer.path not in p.train_bn and freeze_bn:
      _switch_bn(module, layer.path, layers.FrozenBatchNorm)
  plan = Plan(**{f.name: getattr(p, f.name) for f in dataclasses.fields(p)})
  if args or kwargs:
    _create_records(model, args, kwargs)
  return plan


def _records(model) -> list[tuple[str, Any, variables.Compression]]:
  """``(path, module, Compression variable)`` of every recording module.

  A :class:`~lowrank_vjp._src.nnx.layers.Contraction` reports under its
  layer's path; any other module holding a ``Compression`` variable as
  ``lowrank_stats`` (a trained BatchNorm, the NNX models' LayerNorms)
  under its own path.
  """
  out = []
  for path, module in nnx.iter_graph(model):
    if isinstance(module, layers.Contraction):
      out.append((module.path, module, module.stats))
    elif isinstance(getattr(module, "lowrank_stats", None),
                    variables.Compression):
      out.append((_join(path), module, module.lowrank_stats))
  return out


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _traced(transform, body, state, args, kwargs, zeros: bool = False):
  """``body(state, args, kwargs)`` under a transform, only arrays traced.

  ``transform`` is ``jax.eval_shape`` (called as ``transform(f, *args)``)
  or, with ``zeros``, ``jax.jit``.

  Python values among the example arguments (``train=True``) stay static;
  arrays and ``jax.ShapeDtypeStruct`` s are abstract (with ``zeros``, built
  as zeros inside the traced function, for ``jax.jit``: nothing is copied
  in, and what does not depend on them is all that is computed).
  """
  leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
  where = [i for i, x in enumerate(leaves) if _is_array(x)]
  specs = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype)
           for i in where]

  def call(s, *arrays):
    filled = list(leaves)
    for i, x in zip(where, arrays, strict=True):
      filled[i] = x
    a, k = jax.tree_util.tree_unflatten(tree, filled)
    return body(s, a, k)

  if not zeros:
    return transform(call, state, *specs)
  return transform(lambda s: call(s, *[jnp.zeros(x.shape, x.dtype)
                                       for x in specs]))(state)


def _create_records(model, args, kwargs) -> None:
  """Creates every record at its shape from the example call.

  Statistics start as zeros (no rank needed yet, nothing overflowed); a
  stateful method's state starts as its own fresh state (ASI: unstarted,
  so the first step runs the exact start). The shapes come from an
  abstract call; the fresh states from a jitted one that computes nothing
  else (they depend on no input).
  """
  graphdef, state = nnx.split(model)

  def records(s, a, k):
    m = nnx.merge(graphdef, s)
    m(*a, **k)
    return {path: v.get_value() for path, _, v in _records(m)}

  def fresh(s, a, k):
    with layers.fresh_states() as found:
      nnx.merge(graphdef, s)(*a, **k)
    return dict(found)

  shapes = _traced(jax.eval_shape, records, state, args, kwargs)
  states = {}
  if any(isinstance(m, layers.Contraction) and m.method.stateful
         for _, m, _ in _records(model)):
    states = _traced(jax.jit, fresh, state, args, kwargs, zeros=True)
  for path, module, record in _records(model):
    if shapes.get(path) is not None:
      record.set_value(jax.tree_util.tree_map(
          lambda t: jnp.zeros(t.shape, t.dtype), shapes[path]))
    if path in states:
      module.method_state.set_value(states[path])


def stats(model: nnx.Module) -> dict[str, stats_lib.CompressionStats]:
  """``{path: CompressionStats}`` of the model's compressed layers.

  Exactly the layers :func:`apply` compressed, the trained BatchNorms that
  keep a compressed residual, and the modules that record on their own
  (a ``Compression`` variable as ``lowrank_stats``: the NNX transformers'
  LayerNorms), each with its last call's statistics;
  a layer not yet called (created without an example input) is left out.
  What :meth:`lowrank_vjp.RankController.observe` reads, with the same keys
  as :func:`lowrank_vjp.rank_capacities`.
  """
  out = {}
  for path, _, record in _records(model):
    value = record.get_value()
    if value is not None:
      out[path] = value
  return dict(sorted(out.items()))


def compressed_paths(model: nnx.Module) -> tuple[str, ...]:
  """Paths of the layers a plan compresses, in path order."""
  return tuple(sorted((p for p, _, _ in _records(model)), key=_natural))

