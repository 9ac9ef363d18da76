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


@pytest.fixture
def gpu_choice(monkeypatch):
  """The GPU solver choice as in a new process."""
  monkeypatch.setattr(lapack, "_gpu_eigh", {"chosen": False, "name": None})
  monkeypatch.delenv("LOWRANK_VJP_GPU_EIGH", raising=False)
  return monkeypatch


def test_gpu_eigh_defaults_to_jaxlib_and_reads_the_environment(gpu_choice):
  assert lapack.gpu_eigh() is None
  gpu_choice.setenv("LOWRANK_VJP_GPU_EIGH", "Jacobi")
  assert lapack.gpu_eigh() == "jacobi"
  gpu_choice.setenv("LOWRANK_VJP_GPU_EIGH", "")    # empty: jaxlib's choice
  assert lapack.gpu_eigh() is None
  gpu_choice.setenv("LOWRANK_VJP_GPU_EIGH", "syevd")
  with pytest.raises(ValueError, match="LOWRANK_VJP_GPU_EIGH.*'syevd'"):
    lapack.gpu_eigh()


def test_set_gpu_eigh_overrides_the_environment_and_checks(gpu_choice):
  gpu_choice.setenv("LOWRANK_VJP_GPU_EIGH", "jacobi")
  lv.set_gpu_eigh("qr")
  assert lapack.gpu_eigh() == "qr"
  lv.set_gpu_eigh(None)
  assert lapack.gpu_eigh() is None
  for bad in ("syevj", 1, "JACOBI "):
    with pytest.raises(ValueError, match="implementation must be one of"):
      lv.set_gpu_eigh(bad)


@pytest.mark.parametrize("choice", [None, "jacobi", "qr"])
def test_every_choice_solves_the_same_problem(gpu_choice, choice):
  """Off a GPU the choice changes nothing; on one, each solver agrees with
  jaxlib's default to float32 round-off."""
  a = jax.random.normal(jax.random.PRNGKey(0), (48, 96))
  g = a @ a.T
  w0, v0 = jnp.linalg.eigh(g)
  lv.set_gpu_eigh(choice)
  w, v = jax.jit(lapack.eigh)(g)
  assert w.shape == w0.shape and v.shape == v0.shape
  scale = float(w0[-1])
  assert jnp.max(jnp.abs(w - w0)) <= 1e-5 * scale
  # Eigenvectors up to sign: reconstruct the Gram.
  assert jnp.max(jnp.abs((v * w) @ v.T - g)) <= 1e-4 * scale
