"""Memory measurement: XLA's whole-step figures and per-layer tables."""

from lowrank_vjp._src.measure.xla import format_table as format_table
from lowrank_vjp._src.measure.xla import layer_table as layer_table
from lowrank_vjp._src.measure.xla import LayerMemory as LayerMemory
from lowrank_vjp._src.measure.xla import temp_bytes_per_layer as temp_bytes_per_layer
from lowrank_vjp._src.measure.xla import vjp_residual_bytes as vjp_residual_bytes
from lowrank_vjp._src.measure.xla import xla_memory as xla_memory
from lowrank_vjp._src.measure.xla import XlaMemory as XlaMemory
from lowrank_vjp._src.measure.max_batch import max_batch as max_batch
from lowrank_vjp._src.measure.max_batch import MaxBatch as MaxBatch
from lowrank_vjp._src.measure.report import (
    full_size_residuals as full_size_residuals,
)
from lowrank_vjp._src.measure.report import (
    FullSizeResidualWarning as FullSizeResidualWarning,
)
from lowrank_vjp._src.measure.report import LayerBytes as LayerBytes
from lowrank_vjp._src.measure.report import memory_report as memory_report
from lowrank_vjp._src.measure.report import MemoryReport as MemoryReport

__all__ = (
    "FullSizeResidualWarning",
    "LayerBytes",
    "LayerMemory",
    "MaxBatch",
    "MemoryReport",
    "XlaMemory",
    "format_table",
    "full_size_residuals",
    "layer_table",
    "max_batch",
    "memory_report",
    "temp_bytes_per_layer",
    "vjp_residual_bytes",
    "xla_memory",
)
