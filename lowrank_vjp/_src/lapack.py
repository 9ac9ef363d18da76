"""The threads of the CPU's LAPACK: one by default, robust on shared cores.

On the CPU, jaxlib runs ``eigh``, ``qr`` and ``svd`` through the LAPACK of
SciPy's wheel, an OpenBLAS whose worker threads busy-wait for work. When
other processes share the cores, a call waits for workers that are not
scheduled. Measured on a 2-core machine with two busy processes beside it
(jaxlib 0.10.2, SciPy's OpenBLAS 0.3.30, median of 15 calls): one 96×96
``eigh`` took 80 ms with OpenBLAS's 2 threads and 0.8 ms with one; a
320×320 one 1464 ms and 10 ms. Idle, one thread is as fast up to 320×320
and 1.1–1.4× slower at 960–1280 (86 → 97 ms, 141 → 200 ms).

The decompositions therefore set that OpenBLAS to one thread the first time
one of them is traced for the CPU, unless the user chose otherwise:
``OPENBLAS_NUM_THREADS`` in the environment, or
:func:`set_cpu_lapack_threads` (which also restores OpenBLAS's own setting
with ``None``). Only the OpenBLAS inside SciPy's installation is touched
(NumPy's, a separate library in the wheels, keeps its threads); where SciPy
uses a system BLAS nothing is changed.

On a GPU, ``eigh`` goes to cuSOLVER: jaxlib's default is the batched Jacobi
solver (``syevj``) up to 32×32 and the divide-and-conquer ``syevd`` above,
whose latency dominates a compressed layer's forward at MobileNetV2's
channel counts (docs/benchmarks/gpu/README.md). :func:`set_gpu_eigh` picks
the solver for every size (``"jacobi"`` or ``"qr"``, jaxlib's names), or
gives the choice back to jaxlib (``None``); the environment variable
``LOWRANK_VJP_GPU_EIGH`` sets the same before the first decomposition is
traced. All are exact eigen-solvers in the Gram's dtype: the ranks the ε
rule picks do not depend on the choice beyond round-off.
"""

from __future__ import annotations

import os
import threading

import jax
import jax.numpy as jnp
from jax import lax

_LOCK = threading.Lock()
_DEFAULT_THREADS = 1
_state = {"chosen": False, "applied": False, "saved": None}


def _scipy_blas_controllers() -> list:
  """threadpoolctl's controllers of the BLAS libraries shipped with SciPy."""
  try:
    import scipy
    import scipy.linalg.cython_lapack  # noqa: F401  (loads SciPy's LAPACK)
    import threadpoolctl
  except ImportError:
    return []
  root = os.path.dirname(os.path.realpath(scipy.__file__))
  # pip wheels keep the library in site-packages/scipy.libs, beside scipy/.
  return [c for c in threadpoolctl.ThreadpoolController().lib_controllers
          if c.user_api == "blas"
          and os.path.realpath(c.filepath).startswith(root)]


def _set(threads: int | None) -> None:
  controllers = _scipy_blas_controllers()
  if _state["saved"] is None:
    _state["saved"] = {c.filepath: c.num_threads for c in controllers}
  for c in controllers:
    n = _state["saved"].get(c.filepath, c.num_threads) if threads is None \
        else threads
    c.set_num_threads(n)
  _state["applied"] = True


def set_cpu_lapack_threads(threads: int | None) -> None:
  """Sets the threads of the LAPACK that jaxlib uses on the CPU.

  The decompositions call it with 1 the first time they are traced for the
  CPU (see the module docstring for the measurements); call it yourself to
  choose another count, or with ``None`` to give SciPy's OpenBLAS back its
  own setting. Either way the library no longer changes it.

  Args:
    threads: A positive int, or None.

  Raises:
    ValueError: for anything else.
  """
  if threads is not None and (isinstance(threads, bool)
                              or not isinstance(threads, int) or threads < 1):
    raise ValueError(
        f"threads must be a positive int or None; got {threads!r}.")
  with _LOCK:
    _state["chosen"] = True
    _set(threads)


def prepare() -> None:
  """Called before tracing a decomposition: the one-thread default, once.

  Does nothing off the CPU, when ``OPENBLAS_NUM_THREADS`` is set, after
  :func:`set_cpu_lapack_threads`, or after the first call.
  """
  if _state["chosen"] or _state["applied"]:
    return
  if jax.default_backend() != "cpu" or "OPENBLAS_NUM_THREADS" in os.environ:
    _state["applied"] = True
    return
  with _LOCK:
    if not (_state["chosen"] or _state["applied"]):
      _set(_DEFAULT_THREADS)


_GPU_EIGH_CHOICES = {"jacobi": "JACOBI", "qr": "QR"}
_gpu_eigh = {"chosen": False, "name": None}


def _check_gpu_eigh(name, what):
  if name is not None and name not in _GPU_EIGH_CHOICES:
    raise ValueError(f"{what} must be one of {sorted(_GPU_EIGH_CHOICES)} or "
                     f"None (jaxlib's choice by size); got {name!r}.")
  return name


def set_gpu_eigh(implementation: str | None) -> None:
  """Chooses the cuSOLVER eigen-solver of every decomposition on a GPU.

  Takes effect for programs traced afterwards; it changes nothing on other
  backends. Overrides ``LOWRANK_VJP_GPU_EIGH``.

  Args:
    implementation: ``"jacobi"`` (``syevj`` at every size), ``"qr"``
      (``syevd``), or None: jaxlib's default (``syevj`` up to 32×32, else
      ``syevd``).

  Raises:
    ValueError: for any other value.

  Example:
    >>> import lowrank_vjp as lv
    >>> lv.set_gpu_eigh("jacobi")   # cuSOLVER's syevj in programs traced now
    >>> lv.set_gpu_eigh(None)       # jaxlib's choice by size again
  """
  _gpu_eigh["name"] = _check_gpu_eigh(implementation, "implementation")
  _gpu_eigh["chosen"] = True


def gpu_eigh() -> str | None:
  """The solver :func:`eigh` asks cuSOLVER for (None: jaxlib's choice)."""
  if not _gpu_eigh["chosen"]:
    env = os.environ.get("LOWRANK_VJP_GPU_EIGH") or None
    return _check_gpu_eigh(env and env.lower(), "LOWRANK_VJP_GPU_EIGH")
  return _gpu_eigh["name"]


def eigh(a):
  """``jnp.linalg.eigh`` after :func:`prepare`; on a GPU, by
  :func:`gpu_eigh`'s solver."""
  prepare()
  name = gpu_eigh() if jax.default_backend() == "gpu" else None
  if name is None:
    return jnp.linalg.eigh(a)
  impl = getattr(lax.linalg.EighImplementation, _GPU_EIGH_CHOICES[name])
  v, w = lax.linalg.eigh(a, implementation=impl)
  return w, v


def qr(a):
  """``jnp.linalg.qr`` (reduced) after :func:`prepare`."""
  prepare()
  return jnp.linalg.qr(a)


def svd(a, full_matrices: bool = True):
  """``jnp.linalg.svd`` after :func:`prepare`."""
  prepare()
  return jnp.linalg.svd(a, full_matrices=full_matrices)
