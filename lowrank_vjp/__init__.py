"""lowrank_vjp: training with compressed activations in JAX."""

from lowrank_vjp import flax as flax
from lowrank_vjp import measure as measure
from lowrank_vjp import methods as methods
from lowrank_vjp import models as models
from lowrank_vjp import nnx as nnx
from lowrank_vjp import rules as rules
from lowrank_vjp import tdlrt as tdlrt
from lowrank_vjp._src.control.budget import LayerSample as LayerSample
from lowrank_vjp._src.control.budget import plan_ranks as plan_ranks
from lowrank_vjp._src.control.budget import RankOption as RankOption
from lowrank_vjp._src.control.rank_controller import (
    RankController as RankController,
)
from lowrank_vjp._src.control.rank_controller import RankLadder as RankLadder
from lowrank_vjp._src.control.scope import rank_capacities as rank_capacities
from lowrank_vjp._src.dropins import compressed_conv as compressed_conv
from lowrank_vjp._src.dropins import compressed_dense as compressed_dense
from lowrank_vjp._src.dropins import CompressedConv as CompressedConv
from lowrank_vjp._src.dropins import CompressedDense as CompressedDense
from lowrank_vjp._src.lapack import (
    set_cpu_lapack_threads as set_cpu_lapack_threads,
    set_gpu_eigh as set_gpu_eigh,
)
from lowrank_vjp._src.layers.activations import gelu as gelu
from lowrank_vjp._src.layers.activations import hard_swish as hard_swish
from lowrank_vjp._src.layers.activations import relu as relu
from lowrank_vjp._src.layers.activations import relu6 as relu6
from lowrank_vjp._src.layers.activations import silu as silu
from lowrank_vjp._src.layers.attention import (
    dot_product_attention as dot_product_attention,
)
from lowrank_vjp._src.layers.batchnorm import (
    frozen_batch_norm as frozen_batch_norm,
)
from lowrank_vjp._src.layers.batchnorm_train import batch_norm as batch_norm
from lowrank_vjp._src.layers.fused import bn_relu_conv as bn_relu_conv
from lowrank_vjp._src.layers.layernorm import layer_norm as layer_norm
from lowrank_vjp._src.layers.layernorm import rms_norm as rms_norm
from lowrank_vjp._src.layers.pooling import max_pool as max_pool
from lowrank_vjp._src.methods.checkpoint import checkpointed as checkpointed
from lowrank_vjp._src.ops.vjp import HigherOrderError as HigherOrderError
from lowrank_vjp._src.remat import RESIDUAL_NAME as RESIDUAL_NAME
from lowrank_vjp._src.remat import (
    save_compressed_residuals as save_compressed_residuals,
)
from lowrank_vjp._src.stats import CompressionStats as CompressionStats
from lowrank_vjp._src.stats import RankOverflowError as RankOverflowError
from lowrank_vjp._src.stats import RankOverflowWarning as RankOverflowWarning
from lowrank_vjp._src.stats import raise_on_overflow as raise_on_overflow
from lowrank_vjp._src.tensor.tucker import TuckerResidual as TuckerResidual

__version__ = "0.1.0"

__all__ = (
    "CompressedConv",
    "CompressedDense",
    "CompressionStats",
    "HigherOrderError",
    "LayerSample",
    "RankController",
    "RankLadder",
    "RankOption",
    "RankOverflowError",
    "RankOverflowWarning",
    "RESIDUAL_NAME",
    "TuckerResidual",
    "batch_norm",
    "bn_relu_conv",
    "checkpointed",
    "compressed_conv",
    "compressed_dense",
    "dot_product_attention",
    "flax",
    "frozen_batch_norm",
    "gelu",
    "hard_swish",
    "layer_norm",
    "max_pool",
    "measure",
    "methods",
    "models",
    "nnx",
    "plan_ranks",
    "raise_on_overflow",
    "rank_capacities",
    "rms_norm",
    "set_cpu_lapack_threads",
    "set_gpu_eigh",
    "relu",
    "relu6",
    "rules",
    "save_compressed_residuals",
    "silu",
    "tdlrt",
)
