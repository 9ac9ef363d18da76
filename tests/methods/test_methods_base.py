"""The method protocol: values, validation, the string shorthand, user methods.

Mirrors ``lowrank_vjp/_src/methods/base.py``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax import lax

import lowrank_vjp as lv
import lowrank_vjp.flax as lvf
import lowrank_vjp.rules as lvr
from lowrank_vjp._src.methods import base

M = lv.methods
ALL = (M.Vanilla, M.Hosvd, M.Svd, M.Asi, M.Quant, M.GradFilter, M.Checkpoint)


# --------------------------------------------------------------- values ---


def test_hosvd_defaults_are_valid_and_hashable():
  m = M.Hosvd()
  assert (m.eps, m.ranks, m.rank_fraction, m.on_overflow) == (
      0.9, None, 0.5, "warn")
  assert hash(m) == hash(M.Hosvd())
  assert m == M.Hosvd()
  assert {m: 1}[M.Hosvd()] == 1
  assert m != M.Hosvd(eps=0.8)
  assert m != M.Svd()  # same fields, another method


@pytest.mark.parametrize("cls", ALL)
def test_every_method_is_frozen_hashable_and_keyword_only(cls):
  m = cls()
  assert hash(m) == hash(cls())
  fields = [f for f in dataclasses.fields(m) if f.init]
  if fields:
    with pytest.raises(dataclasses.FrozenInstanceError):
      setattr(m, fields[0].name, getattr(m, fields[0].name))
    with pytest.raises(TypeError):
      cls(getattr(m, fields[0].name))   # positional settings are refused


@pytest.mark.parametrize("eps", [1, 1.0, 0.5, 1e-6, np.float32(0.25),
                                 np.float64(1.0), np.asarray(0.5),
                                 jnp.asarray(0.5)])
def test_valid_eps_is_stored_as_float(eps):
  m = M.Hosvd(eps=eps)
  assert type(m.eps) is float
  assert m.eps == float(eps)


@pytest.mark.parametrize("eps", [0, 0.0, -0.1, 1.0000001, 2, float("nan"),
                                 float("inf"), -float("inf"), True, False,
                                 "0.5", None, np.array([0.5]), 1j])
def test_invalid_eps_raises_naming_eps(eps):
  with pytest.raises(ValueError, match="eps"):
    M.Hosvd(eps=eps)
  with pytest.raises(ValueError, match="eps"):
    M.Svd(eps=eps)


@pytest.mark.parametrize("method", ["tucker", "HOSVD", "", None, 1])
def test_unknown_method_raises_naming_method(method):
  with pytest.raises(ValueError, match="method"):
    M.resolve(method)


@pytest.mark.parametrize("name,cls", [
    ("none", M.Vanilla), ("vanilla", M.Vanilla), ("hosvd", M.Hosvd),
    ("svd", M.Svd), ("asi", M.Asi), ("quant", M.Quant),
    ("gradfilter", M.GradFilter), ("checkpoint", M.Checkpoint)])
def test_known_methods_resolve_to_their_class(name, cls):
  assert type(M.resolve(name)) is cls
  assert name in M.known()


@pytest.mark.parametrize("on_overflow", ["raise", "WARN", None, ""])
def test_invalid_on_overflow_raises(on_overflow):
  with pytest.raises(ValueError, match="on_overflow"):
    M.Hosvd(on_overflow=on_overflow)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan"), True,
                                      "0.5", None])
def test_invalid_rank_fraction_raises(fraction):
  with pytest.raises(ValueError, match="rank_fraction"):
    M.Hosvd(rank_fraction=fraction)
  with pytest.raises(ValueError, match="rank_fraction"):
    M.Asi(rank_fraction=fraction)


@pytest.mark.parametrize("ranks", [0, -1, 1.5, True, "3", (2, 0), (2, "a"),
                                   (2, True), (2, -3), (2.0, 3),
                                   np.array([2, 3])])
def test_invalid_ranks_raise_naming_ranks(ranks):
  with pytest.raises(ValueError, match="ranks"):
    M.Hosvd(ranks=ranks)


@pytest.mark.parametrize("ranks,stored", [
    (None, None), (3, 3), (np.int64(3), 3), ([2, None, 4], (2, None, 4)),
    ((1, 2), (1, 2))])
def test_valid_ranks(ranks, stored):
  m = M.Hosvd(ranks=ranks)
  assert m.ranks == stored
  hash(m)  # lists are turned into tuples, so it stays hashable


@pytest.mark.parametrize("bits", [1, 3, 16, 8.0, True, "8", None])
def test_invalid_bits_raise_naming_bits(bits):
  with pytest.raises(ValueError, match="bits"):
    M.Quant(bits=bits)


@pytest.mark.parametrize("name", ["per_channel", "stochastic"])
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_quant_flags_must_be_bools(name, value):
  with pytest.raises(ValueError, match=name):
    M.Quant(**{name: value})


@pytest.mark.parametrize("radius", [0, -2, 1.5, True, "2"])
def test_invalid_radius_raises(radius):
  with pytest.raises(ValueError, match="radius"):
    M.GradFilter(radius=radius)


# ------------------------------------------------------- the shorthand ---


@pytest.mark.parametrize("name,setting", [
    ("hosvd", "bits"), ("svd", "radius"), ("quant", "eps"),
    ("gradfilter", "eps"), ("asi", "eps"), ("asi", "on_overflow"),
    ("none", "eps"), ("checkpoint", "ranks")])
def test_a_setting_of_another_method_is_a_type_error(name, setting):
  with pytest.raises(TypeError, match=rf"'{name}'.*'{setting}'"):
    M.resolve(name, **{setting: 1})
  with pytest.raises(TypeError, match=setting):
    lv.compressed_conv(method=name, **{setting: 1})
  with pytest.raises(TypeError, match=setting):
    lv.compressed_dense(method=name, **{setting: 1})
  with pytest.raises(TypeError, match=setting):
    lvf.conv_cls(method=name, **{setting: 1})


def test_shorthand_equals_the_value():
  assert M.resolve("hosvd", eps=0.8, ranks=3) == M.Hosvd(eps=0.8, ranks=3)
  assert M.resolve({"method": "quant", "bits": 4}) == M.Quant(bits=4)
  assert lv.compressed_conv(method="svd", eps=0.7).method == M.Svd(eps=0.7)
  assert lv.compressed_dense(method=M.Quant(bits=2)).method == M.Quant(bits=2)
  assert M.resolve(M.Asi()) == M.Asi()


def test_settings_with_a_method_value_are_refused():
  with pytest.raises(TypeError, match="eps"):
    M.resolve(M.Hosvd(), eps=0.5)


def test_method_strings_are_dispatched_in_one_place():
  """No module but the registry compares a method name with a string."""
  import pathlib
  import re
  src = pathlib.Path(lv.__file__).parent
  pattern = re.compile(
      r"""(method|\.label|\.name)\s*(==|!=|in|not in)\s*\(?["'](hosvd|svd|"""
      r"""asi|quant|gradfilter|checkpoint|none)""")
  hits = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py")
          for i, line in enumerate(p.read_text().splitlines(), 1)
          if pattern.search(line)]
  assert not hits, hits


# --------------------------------------------------------- user methods ---


@dataclasses.dataclass(frozen=True)
class Bf16(lv.methods.Method):
  def compress(self, x):
    return x.astype(jnp.bfloat16)

  def decompress(self, residual, like):
    return residual.astype(like.dtype)


@dataclasses.dataclass(frozen=True)
class Exact(lv.methods.Method):
  """A user method that saves the input as it is: gradients must be JAX's."""

  def compress(self, x):
    return {"x": x}

  def decompress(self, residual, like):
    return residual["x"]


DN = ("NHWC", "HWIO", "NHWC")


def _conv_loss(conv):
  return lambda w, x: jnp.sum(jnp.sin(conv(x, w, (1, 1), "SAME",
                                           dimension_numbers=DN)))


def _dense_loss(dense):
  return lambda w, x: jnp.sum(jnp.sin(dense(x, w, (((2,), (0,)), ((), ())))))


def _inputs(shape_x, shape_w, dtype=jnp.float32):
  kx, kw = jax.random.split(jax.random.key(0))
  return (jax.random.normal(kw, shape_w, dtype) * 0.3,
          jax.random.normal(kx, shape_x, dtype))


def test_user_method_conv_gradients():
  w, x = _inputs((4, 8, 8, 3), (3, 3, 3, 5))
  got = jax.jit(jax.grad(_conv_loss(lv.compressed_conv(method=Bf16())),
                         argnums=(0, 1)))(w, x)
  want = jax.grad(_conv_loss(lax.conv_general_dilated), argnums=(0, 1))(w, x)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)  # exact
  err = float(jnp.linalg.norm(got[0] - want[0]) / jnp.linalg.norm(want[0]))
  assert 0 < err < 1e-2          # bfloat16's 8-bit mantissa, nothing more
  # The weight gradient is the one at the decompressed input, exactly.
  x16 = x.astype(jnp.bfloat16).astype(jnp.float32)
  _, vjp = jax.vjp(lambda w: lax.conv_general_dilated(
      x16, w, (1, 1), "SAME", dimension_numbers=DN), w)
  g = jnp.cos(lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                       dimension_numbers=DN))
  np.testing.assert_allclose(got[0], vjp(g)[0], rtol=1e-5, atol=1e-5)


def test_exact_user_method_passes_check_grads(x64):
  del x64
  w, x = _inputs((2, 5, 5, 2), (3, 3, 2, 3), jnp.float64)
  conv = lv.compressed_conv(method=Exact())
  # Jitted: check_grads calls the function and its VJP many times, each
  # op by op otherwise.
  jax.test_util.check_grads(jax.jit(_conv_loss(conv)), (w, x), order=1,
                            modes=["rev"])
  dense = lv.compressed_dense(method=Exact())
  wd, xd = _inputs((3, 4, 6), (6, 5), jnp.float64)
  jax.test_util.check_grads(jax.jit(_dense_loss(dense)), (wd, xd), order=1,
                            modes=["rev"])


def test_user_method_dense_gradients():
  w, x = _inputs((3, 4, 6), (6, 5))
  got = jax.jit(jax.grad(_dense_loss(lv.compressed_dense(method=Bf16())),
                         argnums=(0, 1)))(w, x)
  want = jax.grad(_dense_loss(lax.dot_general), argnums=(0, 1))(w, x)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
  err = float(jnp.linalg.norm(got[0] - want[0]) / jnp.linalg.norm(want[0]))
  assert 0 < err < 1e-2


def test_user_method_residual_is_what_compress_returned():
  w, x = _inputs((4, 8, 8, 3), (3, 3, 3, 5))
  conv = lv.compressed_conv(method=Bf16())
  layer = lambda w, x: conv(x, w, (1, 1), "SAME", dimension_numbers=DN)
  saved = jax.eval_shape(lambda w, x: jax.vjp(layer, w, x)[1], w, x)
  dtypes = sorted((tuple(a.shape), str(a.dtype))
                  for a in jax.tree_util.tree_leaves(saved))
  # The weight and the bfloat16 copy of x: no float32 activation.
  assert dtypes == sorted([((3, 3, 3, 5), "float32"),
                           ((4, 8, 8, 3), "bfloat16")]), dtypes


class _Net(nn.Module):
  conv_cls: object = None

  @nn.compact
  def __call__(self, x):
    kw = {} if self.conv_cls is None else {
        "conv_general_dilated_cls": self.conv_cls}
    x = nn.Conv(4, (3, 3), name="conv", **kw)(x)
    return nn.Dense(2, name="head")(x.mean((1, 2)))


def test_user_method_in_flax_and_rules():
  _, x = _inputs((2, 6, 6, 3), (1,))
  params = _Net().init(jax.random.key(1), x)["params"]

  def loss(net, params, plan=None):
    if plan is None:
      y, _ = net.apply({"params": params}, x, mutable=["compression"])
    else:
      with plan.intercept():
        y, _ = net.apply({"params": params}, x, mutable=["compression"])
    return jnp.sum(y ** 2)

  # Jitted gradients (op by op, every operation compiled on its own).
  want = jax.jit(jax.grad(lambda p: loss(_Net(), p)))(params)
  adapter = _Net(conv_cls=lvf.conv_cls(Exact()))
  by_adapter = jax.jit(jax.grad(lambda p: loss(adapter, p)))(params)
  _, sown = adapter.apply({"params": params}, x, mutable=["compression"])
  assert lvf.collect_stats(sown)["conv"].method == "exact"
  # Through a rule, on a model that does not mention the method.
  plan = lvr.plan(_Net(), [lvr.Rule("conv", Exact()), lvr.Rule("head")], x)
  assert plan.compressed == (("conv", Exact()),)
  by_rule = jax.jit(jax.grad(lambda p: loss(_Net(), p, plan)))(params)
  for a, b, c in zip(jax.tree_util.tree_leaves(by_adapter),
                     jax.tree_util.tree_leaves(want),
                     jax.tree_util.tree_leaves(by_rule)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, b, rtol=1e-5, atol=1e-6)
  # bfloat16 in Flax: the weight gradient moves, the rest stays exact.
  bf = jax.jit(jax.grad(
      lambda p: loss(_Net(conv_cls=lvf.conv_cls(Bf16())), p)))(params)
  np.testing.assert_allclose(bf["head"]["kernel"], want["head"]["kernel"],
                             rtol=1e-2, atol=1e-3)
  err = float(jnp.linalg.norm(bf["conv"]["kernel"] - want["conv"]["kernel"])
              / jnp.linalg.norm(want["conv"]["kernel"]))
  assert 0 < err < 1e-2


def test_user_method_without_compress_says_what_to_write():
  @dataclasses.dataclass(frozen=True)
  class Empty(lv.methods.Method):
    pass

  w, x = _inputs((2, 4, 4, 1), (3, 3, 1, 1))
  with pytest.raises(NotImplementedError, match="compress"):
    jax.grad(_conv_loss(lv.compressed_conv(method=Empty())))(w, x)


def test_a_named_user_method_resolves_by_its_shorthand():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Half(lv.methods.Method):
    name = "test_half_precision"
    keep: float = 1.0

    def compress(self, x):
      return x.astype(jnp.float16)

    def decompress(self, residual, like):
      return residual.astype(like.dtype)

  assert M.resolve("test_half_precision", keep=0.5) == Half(keep=0.5)
  with pytest.raises(TypeError, match="keep"):
    M.resolve("test_half_precision", eps=0.5)
  base._REGISTRY.pop("test_half_precision")  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class _Doubled(Exact):
  """Both gradients read what ``cotangent`` returns: twice ``g``."""

  seen: list = dataclasses.field(default_factory=list, compare=False,
                                 hash=False)

  def cotangent(self, op, g):
    return 2 * g

  def input_grad(self, op, residual, rhs, g):
    self.seen.append(("input", g.shape))
    return super().input_grad(op, residual, rhs, g)

  def weight_grad(self, op, residual, g):
    self.seen.append(("weight", g.shape))
    return super().weight_grad(op, residual, g)


def test_both_gradients_read_what_cotangent_returns():
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))

  def grads(method):
    conv = lv.compressed_conv(method=method)
    return jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(
        x, w, (1, 1), "SAME", dimension_numbers=DN))), argnums=(0, 1))(x, w)

  method = _Doubled()
  exact, doubled = grads(Exact()), grads(method)
  for e, d in zip(exact, doubled, strict=True):
    np.testing.assert_allclose(d, 2 * e, rtol=1e-6, atol=1e-6)
  assert sorted(method.seen) == [("input", (2, 5, 5, 4)),
                                 ("weight", (2, 5, 5, 4))]
