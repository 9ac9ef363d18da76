"""Flax NNX integration: fine-tuning rules, statistics and method state.

An NNX model is changed in place by :func:`apply`: the layers whose paths
match a :class:`lowrank_vjp.rules.Rule` get the compressed contraction
(through ``nnx.Conv``'s ``conv_general_dilated`` / ``nnx.Linear``'s
``dot_general`` hooks), so no layer is rebuilt and loaded weights stay where
they are. Each compressed layer records its
:class:`lowrank_vjp.CompressionStats` in a :class:`Compression` variable
and a stateful method's state (ASI) in a :class:`MethodState` variable:
NNX state like any other, carried through ``nnx.jit`` and saved by Orbax
with the model.

Example::

  import jax, jax.numpy as jnp, optax
  from flax import nnx
  import lowrank_vjp as lv
  import lowrank_vjp.rules as lvr

  model = lv.models.nnx.ResNet18(num_classes=10, rngs=nnx.Rngs(0))
  x = jnp.zeros((32, 64, 64, 3))
  plan = lv.nnx.apply(model, [
      lvr.Rule(r"layer4/.*conv\\d", {"method": "hosvd", "eps": 0.9}),
      lvr.Rule("fc")], x)
  optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=plan.wrt)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(
        loss_fn, argnums=nnx.DiffState(0, plan.wrt))(model)
    optimizer.update(model, grads)
    return loss, lv.nnx.stats(model)

Under ``nnx.jit`` a change of a layer's method (``apply`` again) changes the
graph and retraces; per-layer rank capacities are set as for Linen, by
:func:`lowrank_vjp.rank_capacities` opened inside a jitted function that
takes them as a static argument (one compile per distinct setting).
"""

from __future__ import annotations

from lowrank_vjp._src.nnx.layers import Contraction as Contraction
from lowrank_vjp._src.nnx.layers import FrozenBatchNorm as FrozenBatchNorm
from lowrank_vjp._src.nnx.layers import TrainedBatchNorm as TrainedBatchNorm
from lowrank_vjp._src.nnx.plan import Plan as Plan
from lowrank_vjp._src.nnx.plan import Trained as Trained
from lowrank_vjp._src.nnx.plan import apply as apply
from lowrank_vjp._src.nnx.plan import compressed_paths as compressed_paths
from lowrank_vjp._src.nnx.plan import discover as discover
from lowrank_vjp._src.nnx.plan import restore as restore
from lowrank_vjp._src.nnx.plan import stats as stats
from lowrank_vjp._src.nnx.precision import (
    set_compute_dtype as set_compute_dtype,
)
from lowrank_vjp._src.nnx.variables import Compression as Compression
from lowrank_vjp._src.nnx.variables import MethodState as MethodState

__all__ = (
    "Compression",
    "Contraction",
    "FrozenBatchNorm",
    "MethodState",
    "Plan",
    "Trained",
    "TrainedBatchNorm",
    "apply",
    "compressed_paths",
    "discover",
    "restore",
    "set_compute_dtype",
    "stats",
)
