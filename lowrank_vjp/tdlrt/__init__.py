"""TDLRT: rank-adaptive Tucker-factorized weights (Zangrando et al., 2024).

Tucker kernels (:class:`TuckerWeight`), Flax layers that hold them
(:class:`TuckerConv`, :class:`TuckerDense`), low-rank updates for fine-tuning
(:class:`TuckerAdapter`, and the matrix :class:`LoRAWeight` baseline), and the
TDLRT training step (:func:`init`, :func:`step`, or its stages
:func:`augment`, :func:`galerkin_step`, :func:`truncate` on the schedule of a
:class:`Cycle`). :func:`unfold`,
:func:`tucker_product` and :func:`param_count` come from the library's shared
Tucker algebra. See docs/tdlrt.md.
"""

from lowrank_vjp._src.tdlrt.layers import TuckerConv as TuckerConv
from lowrank_vjp._src.tdlrt.layers import TuckerDense as TuckerDense
from lowrank_vjp._src.tdlrt.low_rank_updates import LoRAWeight as LoRAWeight
from lowrank_vjp._src.tdlrt.low_rank_updates import (
    TuckerAdapter as TuckerAdapter,
)
from lowrank_vjp._src.tdlrt.low_rank_updates import (
    lora_adapter as lora_adapter,
)
from lowrank_vjp._src.tdlrt.low_rank_updates import (
    tucker_adapter as tucker_adapter,
)
from lowrank_vjp._src.tdlrt.protocol import AUGMENT as AUGMENT
from lowrank_vjp._src.tdlrt.protocol import GALERKIN as GALERKIN
from lowrank_vjp._src.tdlrt.protocol import TRUNCATE as TRUNCATE
from lowrank_vjp._src.tdlrt.protocol import Cycle as Cycle
from lowrank_vjp._src.tdlrt.step import (
    SECOND_MOMENT_MODES as SECOND_MOMENT_MODES,
)
from lowrank_vjp._src.tdlrt.step import (
    SECOND_MOMENT_NAMES as SECOND_MOMENT_NAMES,
)
from lowrank_vjp._src.tdlrt.step import TDLRTConfig as TDLRTConfig
from lowrank_vjp._src.tdlrt.step import TDLRTState as TDLRTState
from lowrank_vjp._src.tdlrt.step import augment as augment
from lowrank_vjp._src.tdlrt.step import augment_basis as augment_basis
from lowrank_vjp._src.tdlrt.step import core_tree as core_tree
from lowrank_vjp._src.tdlrt.step import galerkin_step as galerkin_step
from lowrank_vjp._src.tdlrt.step import init as init
from lowrank_vjp._src.tdlrt.step import step as step
from lowrank_vjp._src.tdlrt.step import truncate as truncate
from lowrank_vjp._src.tdlrt.step import truncate_core as truncate_core
from lowrank_vjp._src.tdlrt.step import tucker_paths as tucker_paths
from lowrank_vjp._src.tdlrt.weight import TuckerWeight as TuckerWeight
from lowrank_vjp._src.tdlrt.weight import capacities as capacities
from lowrank_vjp._src.tdlrt.weight import materialize as materialize
from lowrank_vjp._src.tdlrt.weight import mode_sizes as mode_sizes
from lowrank_vjp._src.tdlrt.weight import random_tucker as random_tucker
from lowrank_vjp._src.tdlrt.weight import (
    tucker_from_kernel as tucker_from_kernel,
)
from lowrank_vjp._src.tensor.algebra import param_count as param_count
from lowrank_vjp._src.tensor.algebra import tucker_product as tucker_product
from lowrank_vjp._src.tensor.algebra import unfold as unfold

__all__ = (
    "AUGMENT",
    "GALERKIN",
    "TRUNCATE",
    "Cycle",
    "LoRAWeight",
    "SECOND_MOMENT_MODES",
    "SECOND_MOMENT_NAMES",
    "TDLRTConfig",
    "TDLRTState",
    "TuckerAdapter",
    "TuckerConv",
    "TuckerDense",
    "TuckerWeight",
    "augment",
    "augment_basis",
    "capacities",
    "core_tree",
    "galerkin_step",
    "init",
    "lora_adapter",
    "materialize",
    "mode_sizes",
    "param_count",
    "random_tucker",
    "step",
    "truncate",
    "truncate_core",
    "tucker_adapter",
    "tucker_paths",
    "tucker_from_kernel",
    "tucker_product",
    "unfold",
)
