"""Byte-level language-model data that every machine has: Python's sources.

The corpus is the ``.py`` files of the running interpreter's standard
library (``sysconfig.get_paths()["stdlib"]``), without ``site-packages``,
the test suites, IDLE, lib2to3 and caches: about 600 files and 11 MB on
CPython 3.11. Nothing is downloaded, the text is real (code, docstrings,
comments, licences), and the split is fixed: a file is in ``validation``
when the CRC-32 of its path relative to the library root is ``0 mod 10``
(about a tenth of the bytes), else in ``train``. The corpus differs between
Python versions, so the tfds builder
(:class:`~lowrank_vjp.training.tfds_builders.PythonStdlibText`) names its
config after the version (``py3_11``), and reports carry it.

Each split is one byte stream (the files in sorted path order, each
followed by a newline), stored through tensorflow-datasets as windows of
:data:`CHUNK` + 1 bytes that start every :data:`CHUNK` bytes. A
:class:`TextSplit` serves next-byte prediction from them: example ``i`` is
``(bytes[s : s + L], bytes[s + 1 : s + L + 1])`` of one window, ``L`` the
sequence length, so the tokens are the bytes themselves (vocabulary 256).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

from lowrank_vjp.training import data

CORPUS = "python_stdlib_text"
"""The tfds name of the corpus."""

CHUNK = 1024
"""Bytes between the starts of two stored windows (each holds one more)."""

VOCAB = 256
"""Tokens: bytes."""

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests",
                       "idlelib", "lib2to3", "__pycache__"})
"""Directories of the standard library left out of the corpus."""


def stdlib_root() -> str:
  """The running interpreter's standard-library directory."""
  return sysconfig.get_paths()["stdlib"]


def config_name() -> str:
  """The builder config of this interpreter's corpus, e.g. ``"py3_11"``."""
  return f"py{sys.version_info.major}_{sys.version_info.minor}"


def source_files(root: str | None = None) -> list[str]:
  """The corpus's files: paths relative to ``root``, sorted.

  Args:
    root: A directory of ``.py`` files (default: :func:`stdlib_root`).
  """
  root = stdlib_root() if root is None else root
  out = []
  for d, dirs, files in os.walk(root):
    dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
    out += [os.path.relpath(os.path.join(d, f), root) for f in files
            if f.endswith(".py")]
  return sorted(p.replace(os.sep, "/") for p in out)


def is_validation(relpath: str) -> bool:
  """Whether the file at ``relpath`` (``/``-separated) is validation data."""
  return zlib.crc32(relpath.encode()) % 10 == 0


def split_bytes(split: str, root: str | None = None) -> bytes:
  """One split's byte stream: its files in order, each ending in a newline.

  Args:
    split: ``"train"`` or ``"validation"``.
    root: As for :func:`source_files`.

  Raises:
    ValueError: for another split name.
  """
  if split not in ("train", "validation"):
    raise ValueError(f"split must be 'train' or 'validation'; got {split!r}")
  root = stdlib_root() if root is None else root
  parts = []
  for rel in source_files(root):
    if is_validation(rel) == (split == "validation"):
      with open(os.path.join(root, rel), "rb") as f:
        parts.append(f.read().rstrip(b"\n") + b"\n")
  return b"".join(parts)


def windows(stream: bytes, chunk: int = CHUNK) -> Iterator[np.ndarray]:
  """``uint8[chunk + 1]`` windows of ``stream`` starting every ``chunk`` bytes.

  The tail shorter than a window is dropped.
  """
  data = np.frombuffer(stream, np.uint8)
  for start in range(0, len(data) - chunk, chunk):
    yield data[start:start + chunk + 1]


@dataclasses.dataclass
class TextSplit:
  """Next-byte prediction examples from stored windows, by index.

  The same interface as :class:`~lowrank_vjp.training.Split` (``len``,
  :meth:`get`, :meth:`batch_indices`, ``num_classes``), so the training
  loop runs on it unchanged.

  Attributes:
    source: A sequence of ``{"bytes": uint8[CHUNK + 1]}`` examples (a tfds
      data source, or a list).
    seq_len: Tokens per example (at most the window's ``CHUNK``).
    num_classes: The vocabulary (256).

  Example:
    >>> split = TextSplit([{"bytes": np.arange(1025) % 256}], seq_len=512)
    >>> len(split)
    2
    >>> x, y = split.get([1])
    >>> x[0, :3].tolist(), y[0, :3].tolist()
    ([0, 1, 2], [1, 2, 3])
  """

  source: Sequence
  seq_len: int
  num_classes: int = VOCAB

  def __post_init__(self):
    chunk = len(np.asarray(self.source[0]["bytes"])) - 1 if len(
        self.source) else CHUNK
    if not 1 <= self.seq_len <= chunk:
      raise ValueError(f"seq_len must be in [1, {chunk}] (the stored window)"
                       f"; got {self.seq_len}")
    self._per_window = chunk // self.seq_len

  def __len__(self) -> int:
    return len(self.source) * self._per_window

  @property
  def tokens(self) -> int:
    """Tokens (predicted bytes) in the split."""
    return len(self) * self.seq_len

  def get(self, indices: Sequence[int],
          image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(int32[N, seq_len] inputs, int32[N, seq_len] next bytes)``.

    ``image_size`` is accepted for :class:`~lowrank_vjp.training.Split`'s
    interface and must be None.
    """
    if image_size is not None:
      raise ValueError("a text split has no images: image_size must be None")
    inputs, targets = [], []
    for i in indices:
      window, part = divmod(int(i), self._per_window)
      row = np.asarray(self.source[window]["bytes"], np.int32)
      s = part * self.seq_len
      inputs.append(row[s:s + self.seq_len])
      targets.append(row[s + 1:s + self.seq_len + 1])
    return np.stack(inputs), np.stack(targets)

  def batch_indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of batch ``step``, as :meth:`Split.batch_indices`."""
    return data.epoch_indices(len(self), step, batch_size, seed)


def load(data_dir: str | None = None, seq_len: int = 128
         ) -> dict[str, TextSplit]:
  """The corpus as ``{"train": TextSplit, "test": TextSplit}``.

  ``"test"`` is the validation split (train.py's name for held-out data).
  The tfds builder prepares it on first use in ``data_dir``.

  Args:
    data_dir: tfds data directory (tfds's default when None).
    seq_len: Tokens per example.
  """
  b = data.builder(CORPUS, data_dir)
  return {"train": TextSplit(b.as_data_source(split="train"), seq_len),
          "test": TextSplit(b.as_data_source(split="validation"), seq_len)}
