"""lowrank_vjp._src.remat: compressed residuals named for jax.checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import lowrank_vjp as lv

DN = ("NHWC", "HWIO", "NHWC")


def _block(method):
  # on_overflow="ignore": a warning's callback is replayed by remat in the
  # backward pass, which recomputes the statistics (docs/memory.md).
  settings = {"on_overflow": "ignore"} if method in ("hosvd", "svd") else {}
  conv = lv.compressed_conv(method=method, **settings)

  def block(w, x):
    return lv.relu(conv(x, w, (1, 1), "SAME", dimension_numbers=DN))

  return block


def _operands():
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 4)) * 0.3
  return w, x


def _compiled_grad(fn, *args):
  """The compiled gradient of ``fn`` at ``args``."""
  return jax.jit(jax.grad(fn)).lower(*args).compile()


def _eighs(compiled):
  """Eigendecompositions in a compiled program (LAPACK's syevd)."""
  return compiled.as_text().count("syevd")


@pytest.mark.parametrize("method", ["hosvd", "svd", "quant"])
def test_the_policy_saves_exactly_the_named_residuals(method):
  w, x = _operands()
  block = jax.checkpoint(_block(method),
                         policy=lv.save_compressed_residuals())
  saved = saved_residuals(lambda w, x: jnp.sum(block(w, x)), w, x)
  named = [s for s in saved if lv.RESIDUAL_NAME in s[1]]
  assert named  # the core and factors (or codes) and the ReLU mask
  others = [s for s in saved if lv.RESIDUAL_NAME not in s[1]]
  # Besides them only the block's own arguments (jax.checkpoint keeps its
  # inputs), nothing computed inside the block at full size.
  assert all("argument" in s[1] for s in others), others


def test_the_compression_is_not_redone_in_the_backward_pass():
  w, x = _operands()
  plain = _block("hosvd")
  loss = lambda block: lambda w, x: jnp.sum(block(w, x) ** 2)
  plain_grad = _compiled_grad(loss(plain), w, x)
  once = _eighs(plain_grad)
  assert once >= 1
  # With the policy the saved core and factors are used as they are (before
  # the weight was named too, JAX recomputed the block, HOSVD included, to
  # get it back: twice the eigendecompositions).
  kept = jax.checkpoint(plain, policy=lv.save_compressed_residuals())
  kept_grad = _compiled_grad(loss(kept), w, x)
  assert _eighs(kept_grad) == once
  # The same gradient (the programs counted above, not op-by-op dispatch,
  # which compiled every primitive of the HOSVD on its own).
  np.testing.assert_allclose(kept_grad(w, x), plain_grad(w, x), rtol=1e-5,
                             atol=1e-6)
