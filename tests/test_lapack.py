"""Tests for lowrank_vjp._src.lapack: the CPU LAPACK's threads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import lowrank_vjp as lv
from lowrank_vjp._src import lapack

threadpoolctl = pytest.importorskip("threadpoolctl")


@pytest.fixture
def fresh(monkeypatch):
  """Module state as in a new process; OpenBLAS's threads restored after."""
  controllers = lapack._scipy_blas_controllers()
  if not controllers:
    pytest.skip("SciPy ships no OpenBLAS of its own here")
  before = {c.filepath: c.num_threads for c in controllers}
  monkeypatch.setattr(lapack, "_state",
                      {"chosen": False, "applied": False, "saved": None})
  for c in controllers:  # as OpenBLAS starts: more than one thread
    c.set_num_threads(2)
  yield controllers
  for c in lapack._scipy_blas_controllers():
    c.set_num_threads(before[c.filepath])


def _threads():
  return {c.filepath: c.num_threads for c in lapack._scipy_blas_controllers()}


def test_tracing_a_decomposition_sets_one_thread(fresh, monkeypatch):
  monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
  assert set(_threads().values()) == {2}
  jax.jit(lambda x: lapack.eigh(x @ x.T)).lower(jnp.ones((4, 4)))
  assert set(_threads().values()) == {1}
  lapack.prepare()                      # once only: no further change
  assert lapack._state["applied"]


def test_hosvd_traced_on_the_cpu_sets_one_thread(fresh, monkeypatch):
  monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
  conv = lv.compressed_conv(method="hosvd", eps=0.9)
  x, w = jnp.ones((2, 4, 4, 3)), jnp.ones((3, 3, 3, 2))
  jax.jit(jax.grad(lambda w: conv(x, w, (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC")
                                  ).sum())).lower(w)
  assert set(_threads().values()) == {1}


def test_the_environment_variable_is_left_to_the_user(fresh, monkeypatch):
  monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
  lapack.prepare()
  assert set(_threads().values()) == {2}


def test_an_explicit_choice_wins_and_none_restores(fresh, monkeypatch):
  monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
  lv.set_cpu_lapack_threads(2)
  lapack.prepare()
  assert set(_threads().values()) == {2}
  lv.set_cpu_lapack_threads(1)
  assert set(_threads().values()) == {1}
  lv.set_cpu_lapack_threads(None)       # OpenBLAS's own setting back
  assert set(_threads().values()) == {2}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts(bad):
  with pytest.raises(ValueError, match="threads must be a positive int"):
    lv.set_cpu_lapack_threads(bad)
