"""Fine-tune the last layers of a frozen network from cached features.

When only the last k layers of a network are trained and every BatchNorm
before them uses its running statistics, the frozen prefix is a fixed
function of the image: its output can be computed once per image and reused
by every method, seed and step. This module cuts a Linen model at the input
of one block (``features/17`` of MobileNetV2, ``layer4/0`` of a ResNet):

* :func:`block_inputs` runs the model on images and returns what the block
  receives (the rest of the model is dead code that XLA drops);
* :class:`FromBlock` wraps the model so that ``apply(variables, features)``
  runs it with the block's input replaced by ``features``; the prefix is then
  dead code too, so a jitted training step holds only the tail.

The results equal the full model's to float32 round-off (the cut changes no
arithmetic); ``tests/training/test_training_cached_features.py`` checks it.

:func:`load_net` builds a model ready to fine-tune, cut before its last
layers (a :class:`CutNet`); :func:`cached_batches` computes the block inputs
of the training batches once, and :func:`finetune` trains the last ``k``
layers from them (or from the images, when a trained layer precedes the
cut).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf
import lowrank_vjp.rules as lvr
from lowrank_vjp import models
from lowrank_vjp.training.config import TrainConfig
from lowrank_vjp.training.evaluation import evaluate_arrays
from lowrank_vjp.training.loop import Run, fit
from lowrank_vjp.training.step import final_variables, make_train_step

_BLOCK = re.compile(r"^([^/]+/\d+)/")


def block_of(path: str) -> str | None:
  """The top-level block holding a layer.

  Args:
    path: A module path.

  Returns:
    ``"layer4/0"`` for ``"layer4/0/conv1"``; None when the layer is not
    inside a numbered block (a stem convolution, the classifier).

  Example:
    >>> block_of("features/17/conv/0/0")
    'features/17'
  """
  m = _BLOCK.match(path)
  return m.group(1) if m else None


def cut_block(trained_paths: Sequence[str]) -> str | None:
  """The block to cut at so that every trained layer is behind the cut.

  Args:
    trained_paths: Module paths of the trained layers, earliest first (the
      classifier head may be among them).

  Returns:
    The block of the earliest trained layer that sits in a numbered block,
    or None if a trained layer precedes every block (nothing to cache).
  """
  for path in trained_paths:
    block = block_of(path)
    if block is not None:
      return block
    if not path.startswith(("classifier", "fc")):
      return None  # a stem layer is trained: the whole model is live
  return None


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


@contextlib.contextmanager
def _at_block(block: str, replace) -> Iterator[None]:
  """Calls ``replace(args)`` on the positional arguments of ``block``."""

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and _path(context.module) == block:
      args = replace(args)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def block_inputs(model: nn.Module, variables, x: jax.Array, block: str,
                 **kwargs) -> jax.Array:
  """The input ``block`` receives when ``model`` runs on ``x``.

  Args:
    model: A Linen model.
    variables: Its variables.
    x: Its input, e.g. ``float32[N, S, S, 3]``.
    block: Module path of the block, from :func:`cut_block`.
    **kwargs: Further arguments of ``model.apply`` (``train=False`` to use
      running BatchNorm statistics).

  Returns:
    The block's first positional argument, e.g. ``float32[N, 7, 7, 160]``.
  """
  seen = []

  def keep(args):
    seen.append(args[0])
    return args

  with _at_block(block, keep):
    model.apply(variables, x, **kwargs)
  if len(seen) != 1:
    raise ValueError(f"block {block!r} was called {len(seen)} times")
  return seen[0]


@dataclasses.dataclass(frozen=True)
class FromBlock:
  """``model`` run from ``block``'s input: ``apply(variables, features)``.

  Attributes:
    model: The Linen model.
    block: Module path of the block whose input ``features`` replaces.
    image_shape: Shape of the model's own input; a zero image of this shape
      feeds the prefix, which no output depends on.
  """

  model: nn.Module
  block: str
  image_shape: tuple[int, ...]

  def apply(self, variables, features: jax.Array, *args,
            **kwargs) -> Any:
    """``model.apply`` with the block's input replaced by ``features``."""
    image = jnp.zeros((features.shape[0],) + tuple(self.image_shape[1:]),
                      jnp.float32)
    with _at_block(self.block, lambda a: (features,) + tuple(a[1:])):
      return self.model.apply(variables, image, *args, **kwargs)


# ------------------------------------------------------- a cut network ---


@dataclasses.dataclass
class CutNet:
  """A model ready to fine-tune, cut where the trained layers begin.

  Attributes:
    name: The model's name (:data:`lowrank_vjp.models.MODELS`).
    spec: Its spec.
    model: The Linen model.
    variables: Its variables.
    layers: Its layers (:func:`lowrank_vjp.rules.discover`).
    image_size: Side of its input images.
    weights: The pretrained weights file, or None (random init).
    block: The cut (None: nothing is cached).
    tail: The model run from ``block``'s input (None without a cut).
  """

  name: str
  spec: models.ModelSpec
  model: Any
  variables: Any
  layers: tuple[lvr.Layer, ...]
  image_size: int
  weights: str | None
  block: str | None
  tail: FromBlock | None

  @property
  def first_order(self) -> int:
    """Call order of the first layer behind the cut."""
    return min(layer.order for layer in self.layers
               if layer.path.startswith(self.block + "/"))

  def k_all(self) -> int:
    """How many conv layers "all" is (the papers' count)."""
    return sum(1 for layer in self.layers if layer.kind == "conv"
               and not (self.spec.exclude
                        and re.fullmatch(self.spec.exclude, layer.path)))


def load_net(name: str, num_classes: int, image_size: int, batch: int,
             max_k: int = 4) -> CutNet:
  """The model (ImageNet weights when they install offline), cut before its
  last ``max_k`` conv layers.

  Args:
    name: A name of :data:`lowrank_vjp.models.MODELS`.
    num_classes: Size of the new classifier head.
    image_size: Side of the input images.
    batch: Batch size the layers are discovered at.
    max_k: The most conv layers that will be fine-tuned from the cache.

  Returns:
    The :class:`CutNet`.
  """
  spec = models.get_spec(name)
  weights = models.default_weights(name)
  if weights is not None:
    model, variables = models.pretrained(name, num_classes, weights=weights,
                                         image_size=image_size)
  else:
    model = spec.build(num_classes=num_classes)
    variables = models.init(model, image_size, 0)
  shape = (batch, image_size, image_size, 3)
  layers = lvr.discover(model, jax.ShapeDtypeStruct(shape, jnp.float32),
                        variables=variables, train=True)
  trained = lvr.last_k(layers, max_k, exclude=spec.exclude)
  block = cut_block(trained)
  tail = FromBlock(model, block, shape) if block is not None else None
  return CutNet(name, spec, model, variables, layers, image_size, weights,
                block, tail)


def featurizer(net: CutNet):
  """``images -> block inputs`` (jitted), with frozen BatchNorms.

  Args:
    net: A :class:`CutNet` with a cut.

  Returns:
    A function of ``uint8[N, H, W, C]`` images returning the block's inputs.
  """
  @jax.jit
  def run(variables, images):
    return block_inputs(net.model, variables,
                        models.preprocess(images, net.image_size), net.block,
                        train=False)
  return lambda images: run(net.variables, images)


def cached_batches(net: CutNet, split, steps: int, batch: int,
                   seed: int) -> list[tuple[jax.Array, jax.Array]]:
  """``(features, labels)`` for each step, drawn as train.py draws batches.

  Args:
    net: A :class:`CutNet` with a cut.
    split: The training :class:`~lowrank_vjp.training.data.Split`.
    steps: How many batches.
    batch: Batch size.
    seed: Seed of the batch order.

  Returns:
    One ``(features, int32[batch] labels)`` per step.
  """
  feats = featurizer(net)
  out = []
  for step in range(steps):
    images, labels = split.get(split.batch_indices(step, batch, seed),
                               net.image_size)
    out.append((feats(images), jnp.asarray(labels)))
  return out


def finetune(net: CutNet, settings, k: int, seed: int,
             batches: Sequence[tuple], config: TrainConfig) -> Run:
  """Fine-tunes the last ``k`` conv layers of ``net`` on ``batches``.

  train.py's loop (:func:`~lowrank_vjp.training.fit`): ``len(batches)``
  steps on ``batches[i] = (x, labels)``, cached features when every trained
  layer is behind ``net.block``, else images.

  Args:
    net: The :class:`CutNet`.
    settings: Settings of the compressed layers.
    k: How many conv layers (the papers' count) are fine-tuned.
    seed: Seed of the dropout keys.
    batches: ``[(inputs, labels)]``.
    config: Optimizer, schedule and rank control.

  Returns:
    The :class:`~lowrank_vjp.training.Run` (``run.cached`` tells which
    input it took).
  """
  rules = lvr.fine_tune_last(net.layers, k, settings,
                             exclude=net.spec.exclude, head=net.spec.head)
  plan = lvr.make_plan(net.layers, rules)
  cached = net.tail is not None and all(
      plan.layer(p).order >= net.first_order for p in plan.trainable)
  return fit(net.tail if cached else net.model, plan, net.variables, batches,
             config, seed=seed, image_size=None if cached else net.image_size)


def evaluate_run(net: CutNet, run: Run, inputs, labels) -> float:
  """Top-1 accuracy of a :func:`finetune` run on ``inputs`` (features when
  ``run.cached``, else images; see :func:`eval_inputs`)."""
  return evaluate_arrays(
      net.tail if run.cached else net.model,
      final_variables(run.plan, run.state, run.frozen), inputs, labels,
      image_size=None if run.cached else net.image_size)


def image_batches(split, steps: int, batch: int, seed: int,
                  image_size: int) -> list[tuple[Any, jax.Array]]:
  """``(images, labels)`` for each step, drawn as train.py draws batches."""
  return [(x, jnp.asarray(y)) for x, y in (
      split.get(split.batch_indices(i, batch, seed), image_size)
      for i in range(steps))]


def eval_inputs(net: CutNet, split, n: int, cached: bool = True,
                batch: int = 250):
  """The first ``n`` examples of ``split`` (all if ``n <= 0``) as model
  inputs: ``(block inputs, labels)`` when ``cached`` and ``net`` has a cut,
  else ``(images, labels)``."""
  idx = np.arange(min(n, len(split)) if n > 0 else len(split))
  images, labels = split.get(idx, net.image_size)
  if net.tail is None or not cached:
    return images, jnp.asarray(labels)
  feats = featurizer(net)
  parts = [feats(images[i:i + batch]) for i in range(0, len(idx), batch)]
  return jnp.concatenate(parts), jnp.asarray(labels)


def step_memory(net: CutNet, run: Run, features_shape: Sequence[int],
                labels: jax.ShapeDtypeStruct):
  """XLA's memory of a run's training step: the tail alone and the whole.

  Args:
    net: The :class:`CutNet`.
    run: A :func:`finetune` run on cached features.
    features_shape: Shape of one batch of block inputs.
    labels: The labels' shape and dtype.

  Returns:
    ``(tail, whole)`` :class:`lowrank_vjp.measure.XlaMemory`: the step from
    the cached features, and the step of the whole network from ``uint8``
    images, both at the run's final capacities.
  """
  caps = run.capacities()
  tail = lv.measure.xla_memory(
      run.step_fn, run.state, run.frozen,
      jax.ShapeDtypeStruct(tuple(features_shape), jnp.float32), labels,
      capacities=caps)
  s = net.image_size
  # Built as the run's step was (donated; a no-op on overflow under a
  # controller), so that the two figures compare like with like.
  whole_fn = make_train_step(net.model, run.plan, run.tx, 0, s,
                             redo_on_overflow=run.controller is not None)
  images = jax.ShapeDtypeStruct((labels.shape[0], s, s, 3), jnp.uint8)
  whole = lv.measure.xla_memory(whole_fn, run.state, run.frozen, images,
                                labels, capacities=caps)
  return tail, whole


def needed_ranks(net: CutNet, features, settings,
                 k: int = 4) -> dict[str, list[int]]:
  """The ranks ε needs per mode of the last ``k`` conv inputs, on one batch.

  Args:
    net: A :class:`CutNet` with a cut behind which the ``k`` layers sit.
    features: One batch of block inputs.
    settings: Settings of the compressed layers (HOSVD).
    k: How many conv layers.

  Returns:
    ``{module path: [rank per mode]}``.
  """
  plan = lvr.make_plan(net.layers, lvr.fine_tune_last(
      net.layers, k, settings, head=net.spec.head))

  @jax.jit
  def stats(v, x):
    with plan.intercept():
      _, st = net.tail.apply(v, x, train=True, mutable=["compression"],
                             rngs={"dropout": jax.random.key(0)})
    return lvf.collect_stats(st)

  st = stats(net.variables, features)
  return {p: [int(r) for r in np.asarray(v.needed_ranks).ravel()]
          for p, v in st.items()}
