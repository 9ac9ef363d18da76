"""SVD-ε: a truncated SVD of the batch-mode unfolding (Nguyen et al., 2024).

The baseline of the HOSVD paper: only the batch mode is compressed, so the
residual is ``U_B`` and ``Σ Vᵀ = U_Bᵀ x`` (docs/methods.md §2).
"""

from __future__ import annotations

import dataclasses

from lowrank_vjp._src.methods import tucker


@dataclasses.dataclass(frozen=True, kw_only=True)
class Svd(tucker.EpsTuckerMethod):
  """ε-truncated SVD of the activation's batch-mode unfolding.

  Attributes: as :class:`Hosvd`; ``ranks`` may only be set on the batch
  axis (other entries must be None).

  Example::

    dense = lv.compressed_dense(method=lv.methods.Svd(eps=0.8))
  """

  name = "svd"
  compress_all_axes = False
