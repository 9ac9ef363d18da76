"""Training and counting for factorized weights (TDLRT, Tucker, matrix, LoRA).

The pieces of ``experiments/tdlrt.py`` that do not depend on its network:

* :func:`train_plain` trains whatever a parameter tree holds (arrays,
  :class:`lowrank_vjp.tdlrt.TuckerWeight`, adapters) with an Optax
  optimizer; :func:`train_tdlrt` trains it with TDLRT's rank-adaptive step
  (:func:`lowrank_vjp.tdlrt.step`, or the stages of a
  :class:`lowrank_vjp.tdlrt.Cycle`); both jitted with the state donated,
  raising :class:`NonFiniteLoss` on a non-finite loss;
* :func:`tuckerize` swaps kernels for random Tucker (or matrix) ones,
  :func:`matrix_rank_for` sizes a matrix factorization;
* :func:`param_stats`, :func:`ranks_of`, :func:`optimizer_state_params`
  count what a method keeps;
* :func:`freeze_except` trains only some leaves.

Parameter trees are Linen's ``{layer: {"kernel": …, "bias": …}}``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_vjp import tdlrt as lt

Log = Callable[[dict], object]


class NonFiniteLoss(FloatingPointError):
  """The training loss became NaN or infinite."""


def _check(loss: float, step: int) -> None:
  if not np.isfinite(loss):
    raise NonFiniteLoss(f"loss is {loss} at step {step}")


def train_plain(loss_fn, params, opt: optax.GradientTransformation,
                data_iter: Iterator, steps: int, log: Log, name: str,
                every: int = 50):
  """Trains ``params`` directly: ``steps`` Optax updates of ``loss_fn``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> float32[]``.
    params: The parameter tree (copied: the step donates its state).
    opt: The optimizer.
    data_iter: Yields one batch per step.
    steps: How many steps.
    log: Called with ``{"method", "step", "loss"}`` every ``every`` steps
      and at the last.
    name: The run's name, for ``log``.
    every: Steps between logged losses.

  Returns:
    The trained parameters.

  Raises:
    NonFiniteLoss: when a logged loss is not finite.
  """
  params = jax.tree_util.tree_map(jnp.copy, params)   # the step donates it
  state = (params, opt.init(params))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

  for i in range(steps):
    state, m = train_step(state, next(data_iter))
    if i % every == 0 or i == steps - 1:
      loss = float(m["loss"])
      _check(loss, i)
      log(dict(method=name, step=i, loss=loss))
  return state[0]


def train_tdlrt(loss_fn, params, opt: optax.GradientTransformation,
                config: lt.TDLRTConfig, data_iter: Iterator, steps: int,
                log: Log, name: str, every: int = 50,
                cycle: lt.Cycle | None = None):
  """Trains ``params`` with TDLRT for ``steps`` steps.

  Args:
    loss_fn: ``loss_fn(params, batch) -> float32[]``.
    params: The parameter tree with Tucker kernels (copied).
    opt: The optimizer of the Galerkin step.
    config: TDLRT's settings (truncation τ, adaptive modes, moments).
    data_iter: Yields one batch per step.
    steps: How many steps (each one optimizer step).
    log: Called with ``{"method", "step", "loss", "ranks"}`` every
      ``every`` steps and at the last.
    name: The run's name, for ``log``.
    every: Steps between logged losses.
    cycle: The schedule (:class:`lowrank_vjp.tdlrt.Cycle`, whose
      ``total_steps`` must be ``steps``); None is the paper's algorithm,
      :func:`lowrank_vjp.tdlrt.step` at every step.

  Returns:
    The trained parameters (at their adapted ranks).

  Raises:
    NonFiniteLoss: when a logged loss is not finite.
    ValueError: if ``cycle.total_steps != steps``.
  """
  if cycle is None:
    cycle = lt.Cycle(adaptive_steps=steps, local_steps=1)
  if cycle.total_steps != steps:
    raise ValueError(f"cycle.total_steps is {cycle.total_steps}, but steps "
                     f"is {steps}.")
  state = lt.init(opt, jax.tree_util.tree_map(jnp.copy, params))
  jit = functools.partial(jax.jit, donate_argnums=0)
  fused = jit(functools.partial(lt.step, loss_fn, opt, config))
  galerkin = jit(functools.partial(lt.galerkin_step, loss_fn, opt))
  # These two change the shapes, so there is nothing to donate to.
  augment = jax.jit(functools.partial(lt.augment, loss_fn, config))
  truncate = jax.jit(functools.partial(lt.truncate, config))
  every_stage = (lt.AUGMENT, lt.GALERKIN, lt.TRUNCATE)
  for i in range(steps):
    batch = next(data_iter)
    actions = cycle.actions(i)
    if actions == every_stage:
      state, m = fused(state, batch)
    else:
      if lt.AUGMENT in actions:
        state, _ = augment(state, batch)
      state, m = galerkin(state, batch)
      if lt.TRUNCATE in actions:
        state, _ = truncate(state)
    if i % every == 0 or i == steps - 1:
      loss = float(m["loss"])
      _check(loss, i)
      flat, _ = jax.tree_util.tree_flatten_with_path(
          state.params, is_leaf=lambda x: isinstance(x, lt.TuckerWeight))
      ranks = {jax.tree_util.keystr(p): [int(v) for v in np.asarray(
          w.ranks())] for p, w in flat if isinstance(w, lt.TuckerWeight)}
      log(dict(method=name, step=i, loss=loss, ranks=ranks))
  return state.params


def tuckerize(params, key: jax.Array, names: Sequence[str], ranks,
              init_ranks=None, factorization: str = "tucker"):
  """``params`` with the kernels of layers ``names`` replaced by random
  Tucker (or matrix) kernels of their shapes.

  Args:
    params: The parameter tree (not modified).
    key: PRNG key (folded with each layer's index).
    names: The layers.
    ranks: Rank capacities: one tuple for all, or ``{layer: tuple}``.
    init_ranks: Initial ranks (same forms), or None for the capacities.
    factorization: ``"tucker"`` or ``"matrix"``
      (:func:`lowrank_vjp.tdlrt.random_tucker`).

  Returns:
    The new tree (the other leaves shared).
  """
  params = {k: dict(v) for k, v in params.items()}

  def make(key):  # jitted once for all layers: one compile, not many ops
    out = {}
    for i, name in enumerate(names):
      pick = lambda x, n=name: x[n] if isinstance(x, dict) else x
      out[name] = lt.random_tucker(
          jax.random.fold_in(key, i), params[name]["kernel"].shape,
          pick(ranks), init_ranks=pick(init_ranks),
          factorization=factorization)
    return out

  for name, w in jax.jit(make)(key).items():
    params[name]["kernel"] = w
  return params


def matrix_rank_for(shape: Sequence[int], target_params: int) -> int:
  """Rank of a ``[Π shape[:-1], O]`` factorization with about
  ``target_params`` parameters (``r² + r (m + o)``, core included).

  Example:
    >>> matrix_rank_for((3, 3, 32, 64), 10_000)
    26
  """
  m, o = math.prod(shape[:-1]), shape[-1]
  r = (-(m + o) + math.sqrt((m + o) ** 2 + 4 * target_params)) / 2
  return max(1, min(round(r), min(m, o)))


def layer_params(leaf) -> tuple[int, int]:
  """``(kept, full)`` parameter counts of one leaf (a kernel or an array)."""
  if isinstance(leaf, lt.TuckerWeight):
    r = [int(v) for v in np.asarray(leaf.ranks())]
    return lt.param_count(leaf.modes, r), math.prod(leaf.shape)
  return int(np.size(leaf)), int(np.size(leaf))


def param_stats(params, names: Collection[str]) -> dict[str, float]:
  """Parameters kept by the kernels of ``names`` and by the whole network.

  Returns:
    ``params_kept``, ``params_full``, ``params_kept_frac``,
    ``compression_rate`` (1 − kept / full) and ``factorized_kept_frac``
    (over the kernels of ``names``).
  """
  kept_f = full_f = kept = full = 0
  for name, layer in params.items():
    for key, leaf in layer.items():
      k, f = layer_params(leaf)
      kept += k
      full += f
      if name in names and key == "kernel":
        kept_f += k
        full_f += f
  return {"params_kept": kept, "params_full": full,
          "params_kept_frac": kept / full,
          "compression_rate": 1.0 - kept / full,
          "factorized_kept_frac": kept_f / full_f}


def ranks_of(params, names: Sequence[str]) -> dict[str, list[int]]:
  """Ranks of the Tucker kernels of ``names`` (layers without one omitted)."""
  return {n: [int(v) for v in np.asarray(params[n]["kernel"].ranks())]
          for n in names if isinstance(params[n]["kernel"], lt.TuckerWeight)}


def optimizer_state_params(params, method: str) -> int:
  """Entries of Adam state (mu + nu) for the parameters a method trains.

  TDLRT (``method="tdlrt"``) keeps Adam state only for the cores (``Π r_i``)
  and the other parameters; the factors are updated by the basis step
  without state. Any other method keeps it for every parameter.
  """
  total = 0
  for layer in params.values():
    for leaf in layer.values():
      if isinstance(leaf, lt.TuckerWeight):
        r = [int(v) for v in np.asarray(leaf.ranks())]
        total += math.prod(r) if method == "tdlrt" else lt.param_count(
            leaf.modes, r)
      else:
        total += int(np.size(leaf))
  return 2 * total


def freeze_except(trainable: Collection[tuple[str, str]],
                  tx: optax.GradientTransformation
                  ) -> optax.GradientTransformation:
  """``tx`` on the ``(layer, leaf)`` pairs of ``trainable``; zero updates
  for the rest.

  Example:
    >>> tx = freeze_except({("head", "kernel"), ("head", "bias")},
    ...                    optax.adam(1e-3))
  """
  def labels(tree: Mapping[str, Mapping[str, Any]]):
    return {layer: {k: ("train" if (layer, k) in trainable else "freeze")
                    for k in leaves} for layer, leaves in tree.items()}

  return optax.multi_transform(
      {"train": tx, "freeze": optax.set_to_zero()}, labels)
