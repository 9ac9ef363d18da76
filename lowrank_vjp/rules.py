"""Per-layer fine-tuning rules by module path, for any Linen model.

Example::

  import lowrank_vjp.rules as lvr

  layers = lvr.discover(model, x)                      # abstract trace
  rules = lvr.fine_tune_last(layers, 4, {"method": "hosvd", "eps": 0.8},
                             head="classifier/1")
  plan = lvr.make_plan(layers, rules)
  trained, frozen = plan.split(variables)

  def loss(trained_params, batch):
    v = plan.merge({**trained, "params": trained_params}, frozen)
    with plan.intercept():
      logits, state = model.apply(v, batch["x"], mutable=["compression"])
    ...
"""

from lowrank_vjp._src.finetune.rules import Layer as Layer
from lowrank_vjp._src.finetune.rules import Plan as Plan
from lowrank_vjp._src.finetune.rules import Rule as Rule
from lowrank_vjp._src.finetune.rules import discover as discover
from lowrank_vjp._src.finetune.rules import fine_tune_last as fine_tune_last
from lowrank_vjp._src.finetune.rules import last_k as last_k
from lowrank_vjp._src.finetune.rules import make_plan as make_plan
from lowrank_vjp._src.finetune.rules import plan as plan

__all__ = (
    "Layer",
    "Plan",
    "Rule",
    "discover",
    "fine_tune_last",
    "last_k",
    "make_plan",
    "plan",
)
