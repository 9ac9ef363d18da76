"""Memory measurement: XLA's whole-step figures and per-layer tables."""

from lowrank_vjp._src.measure import format_table as format_table
from lowrank_vjp._src.measure import layer_table as layer_table
from lowrank_vjp._src.measure import LayerMemory as LayerMemory
from lowrank_vjp._src.measure import temp_bytes_per_layer as temp_bytes_per_layer
from lowrank_vjp._src.measure import vjp_residual_bytes as vjp_residual_bytes
from lowrank_vjp._src.measure import xla_memory as xla_memory
from lowrank_vjp._src.measure import XlaMemory as XlaMemory
from lowrank_vjp._src.memory_report import (
    full_size_residuals as full_size_residuals,
)
from lowrank_vjp._src.memory_report import (
    FullSizeResidualWarning as FullSizeResidualWarning,
)
from lowrank_vjp._src.memory_report import LayerBytes as LayerBytes
from lowrank_vjp._src.memory_report import memory_report as memory_report
from lowrank_vjp._src.memory_report import MemoryReport as MemoryReport

__all__ = (
    "FullSizeResidualWarning",
    "LayerBytes",
    "LayerMemory",
    "MemoryReport",
    "XlaMemory",
    "format_table",
    "full_size_residuals",
    "layer_table",
    "memory_report",
    "temp_bytes_per_layer",
    "vjp_residual_bytes",
    "xla_memory",
)
