"""HOSVD-ε: a Tucker core and one factor per mode (Nguyen et al., 2024).

*Activations and Gradients Compression for Model Training* (HOSVD-ε): the
activation a layer saves is replaced by its ε-truncated higher-order SVD —
per mode, the fewest leading singular vectors of the unfolding that explain
a fraction ε of its variance — and the weight gradient is contracted in the
Tucker rank space (docs/methods.md §1).
"""

from __future__ import annotations

import dataclasses

from lowrank_vjp._src.methods import tucker


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hosvd(tucker.EpsTuckerMethod):
  """ε-truncated HOSVD of the saved activation, every mode compressed.

  Attributes:
    eps: Explained variance kept per mode, in ``(0, 1]`` (default 0.9).
    ranks: Static rank capacity per axis (see :class:`TuckerMethod`).
    rank_fraction: Default capacity as a fraction of each axis (0.5).
    on_overflow: ``"warn"``, ``"error"`` or ``"ignore"`` when ε needs more
      components than the capacity holds.

  Example::

    conv = lv.compressed_conv(method=lv.methods.Hosvd(eps=0.9))
  """

  name = "hosvd"
