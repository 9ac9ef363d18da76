"""A Vision Transformer for small images (Linen), built like GPT.

Patches of ``patch_size`` pixels (4 by default, for 28–32 px images) are
embedded by a strided convolution (``patch_embed``, an ``nn.Conv`` that a
rule can compress like any other), a class token and learned positions are
added, and pre-LN blocks (:mod:`lowrank_vjp.models._transformer`, nanoGPT's
names: ``blocks_{i}/attn/c_attn``, ``blocks_{i}/mlp/c_fc``, …) are followed
by ``ln_f`` and the ``head`` on the class token. ``ViT.tiny`` / ``ViT.small``
have ViT-Ti/S widths (192 and 384, 3 and 6 heads, 12 blocks; fewer with
``depth=``). The neighbour fields are GPT's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowrank_vjp.models import _transformer


class ViT(_transformer.Neighbours):
  """ViT classifier of ``[N, H, W, C]`` images.

  Attributes:
    num_classes: Outputs of the ``head``.
    patch_size: Side of a patch (``H`` and ``W`` must be multiples).
    width, depth, heads: Embedding width, blocks, attention heads.
    mlp_ratio: MLP hidden width over ``width``.
    attention, norm_method, activation, attention_method, remat, scan: As
      :class:`lowrank_vjp.models.GPT` (:class:`_transformer.Neighbours`;
      attention is not causal here).

  Example::

    model = lv.models.ViT.tiny(num_classes=10, depth=4)
    logits = model.apply(variables, images)        # [N, 10]
  """

  num_classes: int = 10
  patch_size: int = 4
  width: int = 192
  depth: int = 12
  heads: int = 3
  mlp_ratio: int = 4

  @classmethod
  def tiny(cls, **kwargs) -> ViT:
    """ViT-Ti widths: 192 wide, 3 heads (12 blocks unless ``depth=``)."""
    return cls(**{"width": 192, "heads": 3, **kwargs})

  @classmethod
  def small(cls, **kwargs) -> ViT:
    """ViT-S widths: 384 wide, 6 heads (12 blocks unless ``depth=``)."""
    return cls(**{"width": 384, "heads": 6, **kwargs})

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """``[N, H, W, C]`` images to ``[N, num_classes]`` logits."""
    del train  # no dropout or batch statistics
    choices = self.choices(causal=False)
    if self.width % self.heads:
      raise ValueError(f"ViT: width ({self.width}) must be a multiple of "
                       f"heads ({self.heads}).")
    n, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"ViT: image sides ({h}, {w}) must be multiples of "
                       f"patch_size={p}.")
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                name="patch_embed")(images)
    x = x.reshape(n, -1, self.width)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)), x], 1)
    pos = self.param("pos_embed", _transformer.INIT, (1,) + x.shape[1:])
    x = x + pos
    x = self.run_blocks(x, self.depth, "blocks", self.heads, choices,
                        self.mlp_ratio)
    x = choices.norm("ln_f")(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    name="head")(x[:, 0])
