"""Compression methods: what a layer saves for its backward pass.

Each method is a frozen, hashable, keyword-only dataclass; pass one to any
entry point (``lv.compressed_conv(method=lv.methods.Hosvd(eps=0.9))``) or
use the string shorthand (``method="hosvd", eps=0.9``), which
:func:`resolve` turns into the same value. Subclass :class:`Method` to add
your own (docs/methods.md, "Writing a method").
"""

from lowrank_vjp._src.methods.asi import Asi as Asi
from lowrank_vjp._src.methods.asi import AsiState as AsiState
from lowrank_vjp._src.methods.base import Method as Method
from lowrank_vjp._src.methods.base import known as known
from lowrank_vjp._src.methods.base import resolve as resolve
from lowrank_vjp._src.methods.checkpoint import Checkpoint as Checkpoint
from lowrank_vjp._src.methods.gradfilter import GradFilter as GradFilter
from lowrank_vjp._src.methods.hosvd import Hosvd as Hosvd
from lowrank_vjp._src.methods.quant import Quant as Quant
from lowrank_vjp._src.methods.svd import Svd as Svd
from lowrank_vjp._src.methods.tucker import TuckerMethod as TuckerMethod
from lowrank_vjp._src.methods.vanilla import Vanilla as Vanilla

__all__ = (
    "Asi",
    "AsiState",
    "Checkpoint",
    "GradFilter",
    "Hosvd",
    "Method",
    "Quant",
    "Svd",
    "TuckerMethod",
    "Vanilla",
    "known",
    "resolve",
)
