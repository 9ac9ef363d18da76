"""Flax integration: Linen modules for compressed convolutions, denses and
normalisation layers."""

from __future__ import annotations

from lowrank_vjp._src.flax.linen import ASI_COLLECTION as ASI_COLLECTION
from lowrank_vjp._src.flax.linen import (
    CompressedConvGeneralDilated as CompressedConvGeneralDilated,
)
from lowrank_vjp._src.flax.linen import (
    CompressedDotGeneral as CompressedDotGeneral,
)
from lowrank_vjp._src.flax.linen import (
    StatsDroppedWarning as StatsDroppedWarning,
)
from lowrank_vjp._src.flax.linen import conv_cls as conv_cls
from lowrank_vjp._src.flax.linen import dense_cls as dense_cls
from lowrank_vjp._src.flax.precision import compute_dtype as compute_dtype
from lowrank_vjp._src.flax.stats import COLLECTION as COLLECTION
from lowrank_vjp._src.flax.stats import collect_stats as collect_stats
from lowrank_vjp._src.layers.batchnorm import FrozenBatchNorm as FrozenBatchNorm
from lowrank_vjp._src.layers.batchnorm_train import BatchNorm as BatchNorm
from lowrank_vjp._src.layers.layernorm import LayerNorm as LayerNorm
from lowrank_vjp._src.layers.layernorm import RMSNorm as RMSNorm

__all__ = (
    "ASI_COLLECTION",
    "BatchNorm",
    "COLLECTION",
    "CompressedConvGeneralDilated",
    "CompressedDotGeneral",
    "FrozenBatchNorm",
    "LayerNorm",
    "RMSNorm",
    "StatsDroppedWarning",
    "collect_stats",
    "compute_dtype",
    "conv_cls",
    "dense_cls",
)
