"""ViT in Flax NNX, with the module paths of the Linen one.

The NNX twin of :class:`lowrank_vjp.models.ViT`: ``patch_embed`` (a strided
``nnx.Conv``), ``cls_token``, ``pos_embed``, pre-LN blocks
``blocks_{i}/...`` (:mod:`lowrank_vjp.models._nnx_transformer`), ``ln_f``
and ``head``, with Linen's parameter names and shapes. NNX creates
``pos_embed`` at construction, so the image size and channels are
arguments here (Linen reads them from the first input).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_vjp._src.layers import layernorm
from lowrank_vjp.models import _nnx_common as common
from lowrank_vjp.models import _nnx_transformer as tf


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


class ViT(nnx.Module):
  """ViT classifier of ``[N, H, W, C]`` images (NNX).

  Args:
    num_classes: Outputs of the ``head``.
    patch_size: Side of a patch (``H`` and ``W`` must be multiples).
    width: Embedding width (a multiple of ``heads``).
    depth: Blocks ``blocks_0`` … ``blocks_{depth - 1}``.
    heads: Attention heads.
    mlp_ratio: MLP hidden width over ``width``.
    image_size: ``H`` (and ``W``), or ``(H, W)``, of the images the model
      takes (``pos_embed`` has ``1 + H·W / patch_size²`` rows).
    in_channels: ``C`` of the images.
    attention, norm_method, activation, attention_method, remat, scan: As
      :class:`lowrank_vjp.models.nnx.GPT` (attention is not causal here).
    rngs: Initialisation keys.

  Raises:
    ValueError: naming the field, for an unknown ``attention`` or
      ``activation``, ``remat`` other than None, ``scan`` set, ``width``
      not a multiple of ``heads``, or image sides not multiples of
      ``patch_size``.

  Example::

    model = lowrank_vjp.models.nnx.ViT.tiny(num_classes=10, depth=4,
                                            rngs=nnx.Rngs(0))
    logits = model(images)                    # [N, 10] of [N, 32, 32, 3]
  """

  def __init__(self, num_classes: int = 10, patch_size: int = 4,
               width: int = 192, depth: int = 12, heads: int = 3,
               mlp_ratio: int = 4, *,
               image_size: int | tuple[int, int] = 32, in_channels: int = 3,
               attention: str = "blockwise",
               norm_method: Any = layernorm.DEFAULT_METHOD,
               activation: str = "coded", attention_method: Any = None,
               remat: str | None = None, scan: bool = False,
               rngs: nnx.Rngs):
    c = tf.choices("ViT", attention=attention, norm_method=norm_method,
                   activation=activation, attention_method=attention_method,
                   remat=remat, scan=scan, causal=False)
    if width % heads:
      raise ValueError(f"lowrank_vjp.models.nnx.ViT: width ({width}) must be "
                       f"a multiple of heads ({heads}).")
    h, w = _pair(image_size)
    p = patch_size
    if h % p or w % p:
      raise ValueError(f"lowrank_vjp.models.nnx.ViT: image sides ({h}, {w}) "
                       f"must be multiples of patch_size={p}.")
    self.num_classes = num_classes
    self.patch_size = patch_size
    self.width = width
    self.depth = depth
    self.heads = heads
    self.mlp_ratio = mlp_ratio
    self.image_size = (h, w)
    self.in_channels = in_channels
    self.patch_embed = nnx.Conv(in_channels, width, (p, p), strides=(p, p),
                                padding="VALID", rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, width), jnp.float32))
    tokens = 1 + (h // p) * (w // p)
    self.pos_embed = nnx.Param(tf.INIT(rngs.params(), (1, tokens, width),
                                       jnp.float32))
    for i in range(depth):
      common.set_child(self, f"blocks_{i}", tf.Block(
          width, heads, c, mlp_ratio, path=f"blocks_{i}", rngs=rngs))
    self.ln_f = tf.norm(c, width, "ln_f", rngs=rngs)
    self.head = nnx.Linear(width, num_classes,
                           kernel_init=nnx.initializers.zeros, rngs=rngs)

  @classmethod
  def tiny(cls, *, rngs: nnx.Rngs, **kwargs) -> ViT:
    """ViT-Ti widths: 192 wide, 3 heads (12 blocks unless ``depth=``)."""
    return cls(**{"width": 192, "heads": 3, **kwargs}, rngs=rngs)

  @classmethod
  def small(cls, *, rngs: nnx.Rngs, **kwargs) -> ViT:
    """ViT-S widths: 384 wide, 6 heads (12 blocks unless ``depth=``)."""
    return cls(**{"width": 384, "heads": 6, **kwargs}, rngs=rngs)

  @classmethod
  def vanilla(cls, *, rngs: nnx.Rngs, **kwargs) -> ViT:
    """The same network with Flax's and JAX's own layers."""
    return cls(attention="jax", norm_method="flax", activation="jax",
               rngs=rngs, **kwargs)

  def __call__(self, images: jax.typing.ArrayLike,
               train: bool = False) -> jax.Array:
    """``[N, H, W, C]`` images to ``[N, num_classes]`` logits.

    ``train`` changes nothing (no dropout or batch statistics), as in Linen.

    Raises:
      ValueError: when the images are not ``image_size`` × ``in_channels``.
    """
    del train
    images = jnp.asarray(images)
    n, h, w, ch = images.shape
    if (h, w) != self.image_size or ch != self.in_channels:
      raise ValueError(
          f"lowrank_vjp.models.nnx.ViT: images of {h}×{w}×{ch}, but the "
          f"model was built for image_size={self.image_size}, in_channels="
          f"{self.in_channels} (pos_embed has one row per patch).")
    x = self.patch_embed(images).reshape(n, -1, self.width)
    cls = jnp.broadcast_to(self.cls_token[...], (n, 1, self.width))
    x = jnp.concatenate([cls, x], 1) + self.pos_embed[...]
    for i in range(self.depth):
      x = common.get_child(self, f"blocks_{i}")(x)
    return self.head(self.ln_f(x)[:, 0])
