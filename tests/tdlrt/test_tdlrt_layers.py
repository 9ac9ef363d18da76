"""The Linen layers that hold a ``TuckerWeight``: TuckerConv, TuckerDense."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowrank_vjp as lv
from lowrank_vjp import tdlrt as lt
from lowrank_vjp._src.tdlrt import layers as tdlrt_layers

DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("factorization,stride,padding", [
    ("tucker", 1, "SAME"), ("tucker", 2, ((1, 0), (0, 1))),
    ("matrix", 2, "VALID")])
def test_conv_forward_paths_agree(factorization, stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 6))
  outs = []
  for forward in ("kernel", "factored"):
    conv = lt.TuckerConv(5, (3, 3), ranks=0.5, factorization=factorization,
                         strides=stride, padding=padding, forward=forward)
    params = jax.jit(conv.init)(jax.random.key(1), x)["params"]
    outs.append(jax.jit(conv.apply)({"params": params}, x))
  ref = lax.conv_general_dilated(x, params["kernel"].kernel(), (stride,) * 2,
                                 padding, dimension_numbers=DN)
  np.testing.assert_allclose(outs[0], ref + params["bias"], atol=1e-5)
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_conv_auto_picks_factored_when_cheaper():
  w = lt.TuckerWeight(np.zeros((3, 3, 8, 8)), tuple(
      np.zeros((n, r)) for n, r in ((3, 3), (3, 3), (64, 8), (64, 8))),
                      shape=(3, 3, 64, 64))
  full, fact = tdlrt_layers.conv_macs(w, (3, 3), 64, 64, "tucker")
  assert fact < full


def test_conv_with_compressed_conv_matches_plain_gradient():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  plain = lt.TuckerConv(4, (3, 3), ranks=(3, 3, 2, 2), forward="kernel")
  comp = plain.copy(conv_general_dilated=lv.compressed_conv(eps=1.0))
  params = jax.jit(plain.init)(jax.random.key(1), x)["params"]
  grads = [jax.jit(jax.grad(
      lambda p, m=m: jnp.sum(m.apply({"params": p}, x) ** 2)))(params)
           for m in (plain, comp)]
  for a, b in zip(jax.tree_util.tree_leaves(grads[0]),
                  jax.tree_util.tree_leaves(grads[1]), strict=False):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dense_forward_paths_agree():
  x = jax.random.normal(jax.random.key(0), (3, 5, 12))
  outs = []
  for forward in ("kernel", "factored"):
    dense = lt.TuckerDense(7, ranks=(3, 2), forward=forward)
    params = jax.jit(dense.init)(jax.random.key(1), x)["params"]
    outs.append(jax.jit(dense.apply)({"params": params}, x))
  np.testing.assert_allclose(
      outs[0], x @ params["kernel"].kernel() + params["bias"], atol=1e-5)
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_layer_accepts_pretrained_tucker_param():
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
  x = jax.random.normal(jax.random.key(1), (1, 5, 5, 4))
  conv = lt.TuckerConv(8, (3, 3), use_bias=False, ranks=None)
  params = {"kernel": jax.jit(
      lambda k: lt.tucker_from_kernel(k, ranks=None))(kernel)}
  y = jax.jit(conv.apply)({"params": params}, x)
  ref = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                 dimension_numbers=DN)
  np.testing.assert_allclose(y, ref, atol=1e-4)


def test_conv_macs_formula():
  # The counts read only the weight's static shapes: abstract weights (an
  # eager random_tucker compiled each of its operations on its own).
  w = jax.eval_shape(lambda key: lt.random_tucker(
      key, (3, 3, 16, 32), (3, 3, 4, 8)), jax.random.key(0))
  full, fact = tdlrt_layers.conv_macs(w, (3, 3), 100, 25, "tucker")
  assert full == 25 * 9 * 16 * 32
  assert fact == 100 * 16 * 4 + 25 * 9 * 4 * 8 + 25 * 8 * 32
  w = jax.eval_shape(lambda key: lt.random_tucker(
      key, (3, 3, 16, 32), (12, 8), factorization="matrix"),
                     jax.random.key(0))
  full, fact = tdlrt_layers.conv_macs(w, (3, 3), 100, 25, "matrix")
  assert full == 25 * 9 * 16 * 32
  assert fact == 25 * 9 * 16 * 8 + 25 * 8 * 32


def test_conv_1d_forward_paths_agree():
  x = jax.random.normal(jax.random.key(0), (2, 11, 6))
  outs = []
  for forward in ("kernel", "factored"):
    conv = lt.TuckerConv(5, (3,), ranks=(3, 3, 2), forward=forward,
                         use_bias=False)
    params = jax.jit(conv.init)(jax.random.key(1), x)["params"]
    outs.append(jax.jit(conv.apply)({"params": params}, x))
  ref = lax.conv_general_dilated(x, params["kernel"].kernel(), (1,), "SAME",
                                 dimension_numbers=("NHC", "HIO", "NHC"))
  assert "bias" not in params
  np.testing.assert_allclose(outs[0], ref, atol=1e-5)
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_layers_hold_a_tucker_weight_at_the_requested_capacity():
  x = jnp.ones((1, 6, 6, 8))
  conv = lt.TuckerConv(16, (3, 3), ranks=(None, 2, 0.5, 4), init_ranks=2)
  # Jitted, as in the tests above (op by op, initialisation compiled each
  # of its operations on its own).
  w = jax.jit(conv.init)(jax.random.key(0), x)["params"]["kernel"]
  assert isinstance(w, lt.TuckerWeight) and w.shape == (3, 3, 8, 16)
  assert w.capacity == (3, 2, 4, 4)
  np.testing.assert_array_equal(w.ranks(), [2, 2, 2, 2])
  dense = lt.TuckerDense(10, ranks=3)
  w = jax.jit(dense.init)(jax.random.key(0), jnp.ones((2, 7)))["params"][
      "kernel"]
  assert w.shape == (7, 10) and w.capacity == (3, 3)


def test_layer_errors():
  x = jnp.ones((1, 5, 5, 4))
  with pytest.raises(ValueError, match="forward must be one of"):
    lt.TuckerConv(4, (3, 3), forward="fast").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="forward must be one of"):
    lt.TuckerDense(4, forward="fast").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="needs input"):
    lt.TuckerConv(4, (3, 3)).init(jax.random.key(0), jnp.ones((5, 5, 4)))
  with pytest.raises(ValueError, match="must be a TuckerWeight"):
    lt.TuckerConv(4, (3, 3), use_bias=False).apply(
        {"params": {"kernel": jnp.ones((3, 3, 4, 4))}}, x)
  with pytest.raises(ValueError, match="must be a TuckerWeight"):
    lt.TuckerDense(3, use_bias=False).apply(
        {"params": {"kernel": lt.random_tucker(jax.random.key(0), (5, 3))}},
        jnp.ones((2, 4)))
