"""lowrank_vjp: training with compressed activations in JAX."""

from lowrank_vjp import flax as flax
from lowrank_vjp import measure as measure
from lowrank_vjp._src.activations import relu as relu
from lowrank_vjp._src.activations import relu6 as relu6
from lowrank_vjp._src.compressed import compressed_conv as compressed_conv
from lowrank_vjp._src.compressed import compressed_dense as compressed_dense
from lowrank_vjp._src.compressed import CompressedConv as CompressedConv
from lowrank_vjp._src.compressed import CompressedDense as CompressedDense
from lowrank_vjp._src.compressed import RankOverflowError as RankOverflowError
from lowrank_vjp._src.compressed import RankOverflowWarning as RankOverflowWarning
from lowrank_vjp._src.config import CompressionConfig as CompressionConfig
from lowrank_vjp._src.rank_control import rank_capacities as rank_capacities
from lowrank_vjp._src.rank_control import RankController as RankController
from lowrank_vjp._src.rank_control import RankLadder as RankLadder
from lowrank_vjp._src.residuals import CompressionStats as CompressionStats
from lowrank_vjp._src.residuals import TuckerResidual as TuckerResidual

__version__ = "0.1.0"

__all__ = (
    "CompressedConv",
    "CompressedDense",
    "CompressionConfig",
    "CompressionStats",
    "RankController",
    "RankLadder",
    "RankOverflowError",
    "RankOverflowWarning",
    "TuckerResidual",
    "compressed_conv",
    "compressed_dense",
    "flax",
    "measure",
    "rank_capacities",
    "relu",
    "relu6",
)
