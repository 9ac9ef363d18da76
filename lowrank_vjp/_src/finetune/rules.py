"""Per-layer fine-tuning rules for Linen models, by module path.

A :class:`Rule` says "train the layers whose module path matches this regex,
saving their activations with these settings". Rules are matched against
the layers of a model found by tracing it once (:func:`discover`, abstract:
no FLOPs), and resolved into a :class:`Plan`: which ``nn.Conv`` /
``nn.Dense`` layers get a compressed contraction, which parameters are
trained, which BatchNorms run in training mode. ``Plan.intercept()`` applies
it to any Linen model through ``nn.intercept_methods``, so model code is
never edited and no layer is rebuilt (pretrained weights stay where they
are: the compressed contraction is a parameter-free child of the layer).

The frozen part is not differentiated: :meth:`Plan.split` separates the
trained variables from the rest, the caller differentiates with respect to
the trained ones only, and JAX keeps residuals only for what depends on
them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

from lowrank_vjp._src.flax import linen as flax_linen
from lowrank_vjp._src.layers import batchnorm_train
from lowrank_vjp._src.methods import base as methods_base
from lowrank_vjp._src.methods import quant

_MODULES = flax_linen.MODULES


def _freeze(value):
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  return value


AUTO = "auto"
"""``Rule.bn_method``'s default (see :class:`Rule`)."""

AUTO_BN_METHOD = quant.Quant(bits=8, per_channel=True)
"""What a trained BatchNorm keeps under a compressing rule by default."""


def _method(settings) -> methods_base.Method:
  """A rule's settings as a method: a Method, a dict or ``(key, value)`` s."""
  if isinstance(settings, methods_base.Method | str):
    return methods_base.resolve(settings)
  if not isinstance(settings, Mapping):
    settings = dict(settings)
  settings = {k: _freeze(v) for k, v in settings.items()}
  return methods_base.resolve(settings)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Train the layers whose module path matches ``pattern``.

  Attributes:
    pattern: Regex matched with ``re.fullmatch`` against module paths joined
      by ``/`` (``"features/17/conv/1/0"``, ``"layer4/1/conv2"``). The first
      rule that matches a layer decides for it.
    settings: The compression method of the matched layers: a
      :class:`lowrank_vjp.methods.Method`, a shorthand string, or a dict
      ``{"method": name, **settings}`` (checked and resolved when the rule
      is made). ``None`` trains the layer with its own, uncompressed
      contraction.
    train_bn: Also train the BatchNorm applied right after each matched
      convolution (and any matched BatchNorm): batch statistics, running
      averages updated, scale and bias trained. By default BatchNorm stays
      frozen (running averages, fixed affine), as in the papers; a frozen
      BatchNorm keeps nothing for the backward pass.
    bn_method: What a trained BatchNorm keeps for its backward pass (see
      :func:`lowrank_vjp.batch_norm`): ``"auto"`` (default) keeps 8-bit
      per-channel codes of ``x̂`` (``Quant(bits=8, per_channel=True)``)
      when the rule compresses, and leaves Flax's own ``nn.BatchNorm`` in
      place when it does not; None keeps the exact input (with the written
      out backward pass); or a stateless method.

  Example::

    lvr.Rule(r"features/1[78]/.*", lv.methods.Hosvd(eps=0.8))
    lvr.Rule(r"layer4/.*", {"method": "svd", "eps": 0.9})   # the same form
    lvr.Rule("classifier/1")          # train the head, uncompressed
  """

  pattern: str
  settings: Any = None
  train_bn: bool = False
  bn_method: Any = AUTO

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(
          f"Rule pattern {self.pattern!r} is not a regex: {e}") from e
    if self.settings is not None:
      object.__setattr__(self, "settings", _method(self.settings))
    if not (isinstance(self.bn_method, str) and self.bn_method == AUTO):
      object.__setattr__(self, "bn_method", methods_base.resolve_stateless(
          self.bn_method, f"Rule({self.pattern!r}).bn_method"))

  def batch_norm_method(self) -> tuple[bool, methods_base.Method | None]:
    """``(replaced, method)`` for the BatchNorms this rule trains.

    ``replaced`` is False when Flax's own ``nn.BatchNorm`` runs (``"auto"``
    under an uncompressed rule); otherwise :func:`lowrank_vjp.batch_norm`
    runs and keeps ``x̂`` with ``method`` (None: the exact input).
    """
    if not (isinstance(self.bn_method, str) and self.bn_method == AUTO):
      return True, self.bn_method
    if (self.settings is None
        or self.settings.label in methods_base.EXACT_METHODS):
      return False, None
    return True, AUTO_BN_METHOD

  def matches(self, path: str) -> bool:
    """Whether ``path`` (``/``-joined) matches :attr:`pattern` in full."""
    return re.fullmatch(self.pattern, path) is not None

  @property
  def method(self) -> methods_base.Method | None:
    """The compression method (None for an uncompressed rule)."""
    return self.settings


@dataclasses.dataclass(frozen=True)
class Layer:
  """One module call seen while tracing a model.

  Attributes:
    path: Module path joined by ``/``.
    kind: ``"conv"`` (``nn.Conv``), ``"dense"`` (``nn.Dense``,
      ``nn.DenseGeneral``), ``"batch_norm"`` (``nn.BatchNorm``) or
      ``"other"``.
    type_name: The module's class name.
    order: Position of the layer's first call among all calls.
    input_shape: Shape of the first positional argument of that call (the
      activation a convolution saves for its weight gradient), if an array.
    input_itemsize: Bytes per element of that argument (0 if not an array).
    params: Names of the parameters the module itself owns.
  """

  path: str
  kind: str
  type_name: str
  order: int
  input_shape: tuple[int, ...] | None
  input_itemsize: int
  params: tuple[str, ...]

  @property
  def input_nbytes(self) -> int:
    """Bytes of the input activation (what vanilla backprop saves)."""
    if self.input_shape is None:
      return 0
    n = 1
    for d in self.input_shape:
      n *= int(d)
    return n * self.input_itemsize


def _kind(module: nn.Module) -> str:
  if isinstance(module, nn.Conv):
    return "conv"
  if isinstance(module, (nn.Dense, nn.DenseGeneral)):
    return "dense"
  if isinstance(module, nn.BatchNorm):
    return "batch_norm"
  return "other"


def discover(model: nn.Module, *args, variables=None, rngs=None,
             **kwargs) -> tuple[Layer, ...]:
  """The layers of ``model``, in the order they are first called.

  Traces ``model.apply`` abstractly (``jax.eval_shape``: nothing is
  computed), so it is cheap even at full resolution and batch size.

  Args:
    model: A Linen module.
    *args: Arguments of ``model.apply`` (arrays or ``jax.ShapeDtypeStruct``),
      e.g. a batch of images.
    variables: The model's variables (arrays or shapes); by default the
      shapes ``model.init`` would produce.
    rngs: RNGs for ``init``/``apply`` (default: ``"params"`` and
      ``"dropout"`` from fixed keys).
    **kwargs: Keyword arguments of ``model.apply`` (e.g. ``train=True``).

  Returns:
    One :class:`Layer` per module path that was called (parameter-free
    modules included, the library's own Linen modules excluded; the root
    module, path ``""``, only when it owns parameters of its own).

  Example::

    layers = lvr.discover(model, jnp.zeros((64, 224, 224, 3)))
    [l.path for l in layers if l.kind == "conv"][-2:]
    # ['features/17/conv/2', 'features/18/0']
  """
  if rngs is None:
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  if variables is None:
    variables = jax.eval_shape(
        lambda r, *a: model.init(r, *a, **kwargs), rngs, *args)
  seen: dict[str, Layer] = {}
  calls = []

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == "__call__" and not isinstance(module, _MODULES):
      path = "/".join(str(p) for p in module.path)
      if path not in seen:
        x = call_args[0] if call_args else None
        shape = tuple(x.shape) if hasattr(x, "shape") else None
        itemsize = x.dtype.itemsize if hasattr(x, "dtype") else 0
        seen[path] = Layer(path, _kind(module), type(module).__name__,
                           len(calls), shape, itemsize, ())
      calls.append(path)
    return next_fun(*call_args, **call_kwargs)

  def run(v, *a):
    with nn.intercept_methods(record):
      return model.apply(v, *a, rngs=rngs, mutable=True, **kwargs)

  jax.eval_shape(run, variables, *args)
  owned: dict[str, list[str]] = {}
  params = variables.get("params", {}) if isinstance(variables,
                                                     Mapping) else {}
  for key in traverse_util.flatten_dict(dict(params)):
    owned.setdefault("/".join(key[:-1]), []).append(key[-1])
  # The root (path "") is a layer only when it owns parameters itself (a
  # ViT's class token and positions), so that a rule can train them.
  return tuple(dataclasses.replace(layer, params=tuple(owned.get(path, ())))
               for path, layer in seen.items() if path or owned.get(path))


def last_k(layers: Sequence[Layer], k: int, *, exclude: str | None = None,
           kinds: Sequence[str] = ("conv",)) -> tuple[str, ...]:
  """Paths of the last ``k`` layers of the given kinds, in call order.

  Args:
    layers: From :func:`discover`.
    k: How many (``k <= 0`` gives none).
    exclude: Regex (``re.fullmatch``) of paths not counted, e.g. ResNet's
      ``".*/downsample/0"`` (the papers count layer4's 3×3 convolutions only).
    kinds: Layer kinds that count.

  Returns:
    The ``k`` paths, earliest first.

  Raises:
    ValueError: if the model has fewer than ``k`` such layers.
  """
  pool = [layer.path for layer in sorted(layers, key=lambda x: x.order)
          if layer.kind in kinds
          and not (exclude and re.fullmatch(exclude, layer.path))]
  if k > len(pool):
    raise ValueError(f"asked for the last {k} {'/'.join(kinds)} layers but "
                     f"the model has {len(pool)}")
  return tuple(pool[len(pool) - k:]) if k > 0 else ()


def fine_tune_last(layers: Sequence[Layer], k: int, settings=None, *,
                   exclude: str | None = None, head: str | None = None,
                   train_bn: bool = False,
                   bn_method: Any = AUTO) -> tuple[Rule, ...]:
  """Rules for "fine-tune the last ``k`` conv layers with these settings".

  Args:
    layers: From :func:`discover`.
    k: Number of convolutions, counted from the output (see :func:`last_k`).
    settings: Their compression method (a :class:`lowrank_vjp.methods.Method`,
      a shorthand or a settings dict), or None for vanilla backprop.
    exclude: Convolutions not counted (and left frozen).
    head: Regex of further layers trained uncompressed (the classifier).
    train_bn: Train the BatchNorms that follow the chosen convolutions.
    bn_method: What those BatchNorms keep (:attr:`Rule.bn_method`).

  Returns:
    One exact-path :class:`Rule` per convolution, then one for ``head``.

  Example::

    layers = lvr.discover(model, x)
    rules = lvr.fine_tune_last(layers, 4, {"method": "hosvd", "eps": 0.8},
                               head="classifier/1")
    plan = lvr.make_plan(layers, rules)
  """
  rules = [Rule(re.escape(p), settings, train_bn, bn_method)
           for p in last_k(layers, k, exclude=exclude)]
  if head is not None:
    rules.append(Rule(head))
  return tuple(rules)


@contextlib.contextmanager
def _fields(module: nn.Module, **values) -> Iterator[None]:
  """Sets dataclass fields of a bound module for the duration of one call.

  Linen modules are frozen dataclasses; a layer reads fields such as
  ``conv_general_dilated_cls`` when it is called, so setting them around
  the call changes what that call does without rebuilding the layer (whose
  scope, name and parameters stay as they are).
  """
  old = {name: getattr(module, name) for name in values}
  try:
    for name, value in values.items():
      object.__setattr__(module, name, value)
    yield
  finally:
    for name, value in old.items():
      object.__setattr__(module, name, value)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Rules resolved against one model's layers.

  Attributes:
    layers: The model's layers (from :func:`discover`).
    compressed: ``(path, method)`` for each trained ``nn.Conv`` /
      ``nn.Dense`` whose contraction is replaced, in call order.
    trainable: Module paths whose parameters are trained, in call order.
    train_bn: BatchNorm paths run in training mode (and trained).
    freeze_bn: Whether every other BatchNorm is forced to use its running
      averages even when the model is called with ``train=True``.
    bn_methods: ``(path, method or None)`` for each of :attr:`train_bn`:
      what it keeps of ``x̂`` (:func:`lowrank_vjp.batch_norm`; None:
      exact). A path missing here runs as Flax's own ``nn.BatchNorm``.
  """

  layers: tuple[Layer, ...]
  compressed: tuple[tuple[str, Any], ...]
  trainable: tuple[str, ...]
  train_bn: tuple[str, ...]
  freeze_bn: bool = True
  bn_methods: tuple[tuple[str, Any], ...] = ()

  @property
  def compressed_paths(self) -> tuple[str, ...]:
    """Paths of the layers whose contraction is replaced."""
    return tuple(p for p, _ in self.compressed)

  def layer(self, path: str) -> Layer:
    """The :class:`Layer` at ``path``."""
    for layer in self.layers:
      if layer.path == path:
        return layer
    raise KeyError(path)

  @contextlib.contextmanager
  def intercept(self) -> Iterator[None]:
    """Applies the plan to every model call made inside the ``with``.

    Trained convolutions (dense layers) with settings run through
    :func:`lowrank_vjp.flax.conv_cls` (:func:`~lowrank_vjp.flax.dense_cls`),
    which sows :class:`lowrank_vjp.CompressionStats` into the
    ``"compression"`` collection (read it with
    :func:`lowrank_vjp.flax.collect_stats`); with a stateful method (ASI)
    the layers also keep their state in the ``"asi_state"`` collection,
    which the caller passes in and makes mutable; BatchNorms in
    :attr:`train_bn` use batch statistics, the others (with
    :attr:`freeze_bn`) their running averages.
    """
    convs, denses = {}, {}
    for path, method in self.compressed:
      kind = self.layer(path).kind
      target = convs if kind == "conv" else denses
      make = (flax_linen.conv_cls if kind == "conv"
              else flax_linen.dense_cls)
      target[path] = make(method)
    bn_train = frozenset(self.train_bn)
    bn_methods = dict(self.bn_methods)
    freeze_bn = self.freeze_bn

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__" or isinstance(module, _MODULES):
        return next_fun(*args, **kwargs)
      path = "/".join(str(p) for p in module.path)
      if (path in bn_methods and type(module) is nn.BatchNorm and args
          and kwargs.get("mask") is None):
        return batchnorm_train.linen_call(module, args[0], False,
                                          bn_methods[path])
      if path in convs and isinstance(module, nn.Conv):
        with _fields(module, conv_general_dilated_cls=convs[path]):
          return next_fun(*args, **kwargs)
      if path in denses and isinstance(module, (nn.Dense, nn.DenseGeneral)):
        with _fields(module, dot_general_cls=denses[path]):
          return next_fun(*args, **kwargs)
      if isinstance(module, nn.BatchNorm) and (path in bn_train or freeze_bn):
        args = args[:1]  # drop a positional use_running_average
        kwargs = {k: v for k, v in kwargs.items()
                  if k != "use_running_average"}
        with _fields(module, use_running_average=path not in bn_train):
          return next_fun(*args, **kwargs)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      yield

  def _is_trained(self, collection: str, module_path: str) -> bool:
    if collection == "params":
      return module_path in self._trainable_set
    if collection == "batch_stats":
      return module_path in self._bn_set
    return False

  @property
  def _trainable_set(self) -> frozenset[str]:
    return frozenset(self.trainable)

  @property
  def _bn_set(self) -> frozenset[str]:
    return frozenset(self.train_bn)

  def split(self, variables: Mapping[str, Any]
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits variables into ``(trained, frozen)``.

    Args:
      variables: ``{"params": ..., "batch_stats": ..., ...}``.

    Returns:
      ``trained`` holds the parameters of :attr:`trainable` (under
      ``"params"``) and the statistics of :attr:`train_bn` (under
      ``"batch_stats"``); ``frozen`` holds everything else. Both are nested
      dicts; :meth:`merge` puts them back together.
    """
    trained: dict[str, Any] = {}
    frozen: dict[str, Any] = {}
    for col, tree in variables.items():
      flat = traverse_util.flatten_dict(dict(tree))
      t = {k: v for k, v in flat.items()
           if self._is_trained(col, "/".join(k[:-1]))}
      f = {k: v for k, v in flat.items() if k not in t}
      if t:
        trained[col] = traverse_util.unflatten_dict(t)
      if f:
        frozen[col] = traverse_util.unflatten_dict(f)
    return trained, frozen

  @staticmethod
  def merge(trained: Mapping[str, Any], frozen: Mapping[str, Any]
            ) -> dict[str, Any]:
    """The inverse of :meth:`split`."""
    out = {}
    for col in list(frozen) + [c for c in trained if c not in frozen]:
      flat = traverse_util.flatten_dict(dict(frozen.get(col, {})))
      flat.update(traverse_util.flatten_dict(dict(trained.get(col, {}))))
      out[col] = traverse_util.unflatten_dict(flat)
    return out

  def describe(self) -> str:
    """A plain-text table of the trained layers and their settings."""
    settings = dict(self.compressed)
    lines = [f"{'layer':<44} {'kind':<10} {'input':<22} settings"]
    for path in self.trainable:
      layer = self.layer(path)
      s = settings.get(path)
      text = "uncompressed" if s is None else repr(s)
      if path in self.train_bn:
        bns = dict(self.bn_methods)
        kept = ("Flax's own" if path not in bns else "x (exact)"
                if bns[path] is None else f"x̂ as {bns[path]!r}")
        text = f"batch statistics, trained; keeps {kept}"
      lines.append(f"{path:<44} {layer.kind:<10} "
                   f"{str(layer.input_shape):<22} {text}")
    return "\n".join(lines)


def make_plan(layers: Sequence[Layer], rules: Sequence[Rule], *,
              freeze_bn: bool = True, allow_unused: bool = False) -> Plan:
  """Resolves ``rules`` against ``layers``.

  Each layer takes the first rule whose pattern matches its path:

  * ``nn.Conv`` / ``nn.Dense``: trained; with settings, its contraction is
    replaced by the compressed one.
  * ``nn.BatchNorm``: trained, in training mode, only when ``train_bn`` is
    set on its rule or on the rule of the convolution called right before
    it (with no other convolution in between); otherwise frozen.
  * Any other module owning parameters: trained.

  Args:
    layers: From :func:`discover`.
    rules: The rules, first match wins.
    freeze_bn: Force every BatchNorm not trained to use its running averages.
    allow_unused: Accept rules that match no layer (by default an error: a
      misspelt pattern would silently train nothing).

  Returns:
    A :class:`Plan`.

  Raises:
    ValueError: for a rule that matches nothing, or that has settings but
      matches no convolution or dense layer.
  """
  rules = tuple(rules)
  used: dict[int, list[str]] = {i: [] for i in range(len(rules))}
  compressed, trainable, train_bn, bn_methods = [], [], [], []
  pending_bn_rule: Rule | None = None
  for layer in sorted(layers, key=lambda x: x.order):
    idx = next((i for i, r in enumerate(rules) if r.matches(layer.path)),
               None)
    rule = rules[idx] if idx is not None else None
    if layer.kind in ("conv", "dense"):
      pending_bn_rule = rule if layer.kind == "conv" else pending_bn_rule
      if rule is not None:
        used[idx].append(layer.kind)
        trainable.append(layer.path)
        if rule.settings is not None:
          compressed.append((layer.path, rule.settings))
    elif layer.kind == "batch_norm":
      follows = pending_bn_rule is not None and pending_bn_rule.train_bn
      own = rule is not None and rule.train_bn
      if own or follows:
        train_bn.append(layer.path)
        replaced, bn = (rule if own else pending_bn_rule).batch_norm_method()
        if replaced:
          bn_methods.append((layer.path, bn))
        if layer.params:
          trainable.append(layer.path)
      if rule is not None:
        used[idx].append(layer.kind)
      pending_bn_rule = None
    elif rule is not None:
      used[idx].append(layer.kind)
      if layer.params:
        trainable.append(layer.path)
  for i, kinds in used.items():
    if not kinds and not allow_unused:
      raise ValueError(
          f"rule {rules[i].pattern!r} matches no layer; layer paths look "
          f"like {[x.path for x in layers if x.params][:4]}")
    if (kinds and rules[i].settings is not None
        and not {"conv", "dense"} & set(kinds)):
      raise ValueError(
          f"rule {rules[i].pattern!r} has compression settings but matches "
          f"no nn.Conv or nn.Dense (it matches {sorted(set(kinds))})")
  return Plan(tuple(layers), tuple(compressed), tuple(trainable),
              tuple(train_bn), freeze_bn, tuple(bn_methods))


def plan(model: nn.Module, rules: Sequence[Rule], *args,
         variables=None, rngs=None, freeze_bn: bool = True,
         allow_unused: bool = False, **kwargs) -> Plan:
  """:func:`discover` then :func:`make_plan`, in one call.

  Example::

    plan = lvr.plan(model, [lvr.Rule(r"layer4/.*/conv\\d", {"method": "svd"}),
                            lvr.Rule("fc")], x)
    trained, frozen = plan.split(variables)
    with plan.intercept():
      logits, state = model.apply(plan.merge(trained, frozen), x,
                                  mutable=["compression"])
  """
  layers = discover(model, *args, variables=variables, rngs=rngs, **kwargs)
  return make_plan(layers, rules, freeze_bn=freeze_bn,
                   allow_unused=allow_unused)
