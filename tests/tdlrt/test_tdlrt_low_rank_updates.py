"""Low-rank updates for fine-tuning: TuckerAdapter and LoRAWeight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_vjp import tdlrt as lt
from lowrank_vjp._src.tdlrt import weight as tw


def _normal(key, shape, dtype=jnp.float64):
  return jax.random.normal(jax.random.key(key), shape, dtype)


def _orth_err(u, r):
  eye = np.diag((np.arange(u.shape[1]) < r).astype(np.float64))
  return float(np.max(np.abs(np.asarray(u.T @ u, np.float64) - eye)))


@pytest.mark.parametrize("kind", ["tucker", "lora"])
def test_adapters_start_at_base_and_freeze_it(kind):
  base = jax.random.normal(jax.random.key(0), (3, 3, 4, 6))
  if kind == "tucker":
    w = lt.tucker_adapter(jax.random.key(1), base, (3, 3, 2, 2))
  else:
    w = lt.lora_adapter(jax.random.key(1), base, 2, alpha=4.0)
    assert w.num_params == 2 * (36 + 6) and w.scale == 2.0
  np.testing.assert_allclose(jax.jit(lt.materialize)({"k": w})["k"], base)
  g = jax.jit(jax.grad(lambda w: jnp.sum(w.kernel() ** 3)))(w)
  assert np.all(np.asarray(g.base) == 0)


# -------------------------------------------------------- TuckerAdapter --


def test_tucker_adapter_kernel_is_base_plus_delta(x64):
  base = _normal(0, (3, 3, 4, 6))
  # Jitted (op by op, the initialiser compiled each operation on its own).
  delta = jax.jit(lambda key: lt.random_tucker(
      key, base.shape, (2, 2, 3, 3), dtype=jnp.float64))(jax.random.key(1))
  w = lt.TuckerAdapter(base, delta)
  ref = base + jnp.einsum("abcd,ia,jb,kc,ld->ijkl", delta.core,
                          *delta.factors)
  np.testing.assert_allclose(w.kernel(), ref, rtol=1e-12, atol=1e-12)
  assert w.kernel().dtype == jnp.float64
  assert w.kernel(jnp.float32).dtype == jnp.float32
  assert tw.is_structured(w)


def test_tucker_adapter_starts_with_a_zero_core_and_orthonormal_factors():
  base = _normal(2, (3, 3, 8, 16), jnp.float32)
  w = lt.tucker_adapter(jax.random.key(3), base, (3, 2, 0.5, 4),
                        init_ranks=(3, 2, 2, 2))
  assert isinstance(w.delta, lt.TuckerWeight)
  assert w.delta.shape == base.shape
  assert w.delta.capacity == lt.capacities(base.shape, (3, 2, 0.5, 4))
  assert w.delta.capacity == (3, 2, 4, 4)
  assert np.all(np.asarray(w.delta.core) == 0)
  np.testing.assert_array_equal(w.delta.ranks(), [3, 2, 2, 2])
  for u, r in zip(w.delta.factors, (3, 2, 2, 2), strict=True):
    assert _orth_err(u, r) < 1e-5
    assert np.all(np.asarray(u)[:, r:] == 0)
  assert w.delta.core.dtype == base.dtype
  np.testing.assert_array_equal(w.kernel(), base)
  # Pytree: the frozen base, then the delta's core and factors.
  leaves = jax.tree_util.tree_leaves(w)
  assert len(leaves) == 1 + 1 + 4 and leaves[0] is w.base


def test_tucker_adapter_gradient_reaches_the_delta_only(x64):
  base = _normal(4, (4, 5, 6))
  w = jax.jit(lambda key, base: lt.tucker_adapter(key, base, 2))(
      jax.random.key(5), base)
  target = _normal(6, base.shape)
  g = jax.jit(jax.grad(lambda w: jnp.sum((w.kernel() - target) ** 2)))(w)
  assert np.all(np.asarray(g.base) == 0)
  # ∂L/∂core = 2 (W - target) ×ᵢ Uᵢᵀ: non-zero from the first step.
  resid = 2.0 * (base - target)
  ref = resid
  for i, u in enumerate(w.delta.factors):
    ref = jnp.moveaxis(jnp.tensordot(u.T, ref, axes=([1], [i])), 0, i)
  np.testing.assert_allclose(g.delta.core, ref, rtol=1e-10, atol=1e-12)
  assert float(jnp.max(jnp.abs(g.delta.core))) > 0


def test_tucker_adapter_rejects_bad_ranks():
  base = jnp.ones((3, 4, 5))
  with pytest.raises(ValueError, match="entries"):
    lt.tucker_adapter(jax.random.key(0), base, (2, 2))
  with pytest.raises(ValueError, match=">= 1"):
    lt.tucker_adapter(jax.random.key(0), base, 0)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    lt.tucker_adapter(jax.random.key(0), base, 2.0)


# ------------------------------------------------------------ LoRAWeight --


def test_lora_kernel_is_base_plus_scaled_product(x64):
  base = _normal(0, (3, 3, 4, 6))
  a, b = _normal(1, (36, 2)), _normal(2, (2, 6))
  w = lt.LoRAWeight(base, a, b, scale=0.25)
  np.testing.assert_allclose(w.kernel(),
                             base + 0.25 * (a @ b).reshape(base.shape),
                             rtol=1e-12, atol=1e-12)
  assert w.kernel(jnp.float32).dtype == jnp.float32
  # Trainable parameters r · (Π shape[:-1] + O).
  assert w.num_params == 2 * (36 + 6)
  # The scale is static: the pytree's children are base, a and b.
  leaves, treedef = jax.tree_util.tree_flatten(w)
  assert len(leaves) == 3
  assert jax.tree_util.tree_unflatten(treedef, leaves).scale == 0.25
  assert treedef != jax.tree_util.tree_structure(
      lt.LoRAWeight(base, a, b, scale=0.5))


@pytest.mark.parametrize("alpha,scale", [(None, 1.0), (8.0, 2.0), (2, 0.5)])
def test_lora_adapter_initialisation(alpha, scale):
  base = _normal(3, (3, 3, 64, 16), jnp.float32)
  w = lt.lora_adapter(jax.random.key(4), base, 4, alpha=alpha)
  m = 3 * 3 * 64
  assert w.a.shape == (m, 4) and w.b.shape == (4, 16)
  assert w.a.dtype == w.b.dtype == base.dtype
  assert w.scale == scale
  assert np.all(np.asarray(w.b) == 0)
  # a is Gaussian with standard deviation 1 / sqrt(m).
  assert 0.9 < float(jnp.std(w.a)) * np.sqrt(m) < 1.1
  np.testing.assert_array_equal(w.kernel(), base)
  assert w.num_params == 4 * (m + 16)


def test_lora_gradient_at_initialisation_reaches_b_only(x64):
  base = _normal(5, (6, 4))
  w = lt.lora_adapter(jax.random.key(6), base, 2, alpha=4.0)
  target = _normal(7, base.shape)
  g = jax.grad(lambda w: jnp.sum((w.kernel() - target) ** 2))(w)
  assert np.all(np.asarray(g.base) == 0)
  # b = 0, so ∂L/∂a = 0 and ∂L/∂b = scale · aᵀ ∂L/∂W.
  assert np.all(np.asarray(g.a) == 0)
  np.testing.assert_allclose(g.b, w.scale * w.a.T @ (2.0 * (base - target)),
                             rtol=1e-10, atol=1e-12)
