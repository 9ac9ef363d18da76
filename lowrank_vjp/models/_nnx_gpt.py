"""GPT in Flax NNX, with the module paths of the Linen one.

The NNX twin of :class:`lowrank_vjp.models.GPT` (nanoGPT's layout):
``wte``, ``wpe``, ``h_{i}/ln_1``, ``h_{i}/attn/c_attn``,
``h_{i}/attn/c_proj``, ``h_{i}/ln_2``, ``h_{i}/mlp/c_fc``,
``h_{i}/mlp/c_proj``, ``ln_f``, with Linen's parameter names and shapes, so
Linen variables load with :func:`lowrank_vjp.models.nnx.load_linen_variables`
and path rules read the same. The neighbour fields are Linen's; ``remat``
and ``scan`` are not supported (only None / False).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_vjp._src.layers import layernorm
from lowrank_vjp.models import _nnx_common as common
from lowrank_vjp.models import _nnx_transformer as tf


class GPT(nnx.Module):
  """nanoGPT's decoder (NNX): token and position embeddings, pre-LN blocks,
  tied output head.

  Args:
    vocab_size: Tokens.
    block_size: Longest sequence.
    n_layer: Blocks ``h_0`` … ``h_{n_layer - 1}``.
    n_head: Attention heads.
    n_embd: Width (a multiple of ``n_head``).
    attention: ``"blockwise"`` (:func:`lowrank_vjp.dot_product_attention`)
      or ``"jax"`` (``jax.nn.dot_product_attention``).
    norm_method: What the LayerNorms keep of ``x̂`` (default 8-bit codes;
      None exact), or ``"flax"`` for ``nnx.LayerNorm``.
    activation: ``"coded"`` (:func:`lowrank_vjp.gelu`) or ``"jax"``.
    attention_method: What the blockwise attention keeps of ``q``, ``k``,
      ``v`` (None: themselves, exact; or a stateless method).
    remat: Only None (accepted for the Linen fields' sake).
    scan: Only False (accepted for the Linen fields' sake).
    rngs: Initialisation keys.

  Raises:
    ValueError: naming the field, for an unknown ``attention`` or
      ``activation``, ``remat`` other than None, ``scan`` set, or
      ``n_embd`` not a multiple of ``n_head``.

  Example::

    model = lowrank_vjp.models.nnx.GPT(vocab_size=256, block_size=128,
                                       rngs=nnx.Rngs(0))
    logits = model(tokens)                    # [B, T, 256]
  """

  def __init__(self, vocab_size: int = 256, block_size: int = 128,
               n_layer: int = 4, n_head: int = 4, n_embd: int = 256, *,
               attention: str = "blockwise",
               norm_method: Any = layernorm.DEFAULT_METHOD,
               activation: str = "coded", attention_method: Any = None,
               remat: str | None = None, scan: bool = False,
               rngs: nnx.Rngs):
    c = tf.choices("GPT", attention=attention, norm_method=norm_method,
                   activation=activation, attention_method=attention_method,
                   remat=remat, scan=scan, causal=True)
    if n_embd % n_head:
      raise ValueError(f"lowrank_vjp.models.nnx.GPT: n_embd ({n_embd}) must "
                       f"be a multiple of n_head ({n_head}).")
    self.vocab_size = vocab_size
    self.block_size = block_size
    self.n_layer = n_layer
    self.n_head = n_head
    self.n_embd = n_embd
    self.wte = nnx.Embed(vocab_size, n_embd, embedding_init=tf.INIT,
                         rngs=rngs)
    self.wpe = nnx.Embed(block_size, n_embd, embedding_init=tf.INIT,
                         rngs=rngs)
    for i in range(n_layer):
      common.set_child(self, f"h_{i}", tf.Block(n_embd, n_head, c,
                                                path=f"h_{i}", rngs=rngs))
    self.ln_f = tf.norm(c, n_embd, "ln_f", rngs=rngs)

  @classmethod
  def vanilla(cls, *, rngs: nnx.Rngs, **kwargs) -> GPT:
    """The same network with Flax's and JAX's own layers."""
    return cls(attention="jax", norm_method="flax", activation="jax",
               rngs=rngs, **kwargs)

  def __call__(self, tokens: jax.typing.ArrayLike,
               train: bool = False) -> jax.Array:
    """``[B, T]`` int tokens to ``[B, T, vocab_size]`` logits.

    ``train`` is accepted for the training loop's sake and changes nothing
    (no dropout), as in Linen.

    Raises:
      ValueError: when ``T`` exceeds ``block_size``.
    """
    del train
    tokens = jnp.asarray(tokens)
    t = tokens.shape[1]
    if t > self.block_size:
      raise ValueError(f"lowrank_vjp.models.nnx.GPT: sequence of {t} tokens "
                       f"is longer than block_size={self.block_size}.")
    x = self.wte(tokens) + self.wpe(jnp.arange(t))[None]
    for i in range(self.n_layer):
      x = common.get_child(self, f"h_{i}")(x)
    return self.wte.attend(self.ln_f(x))
