"""Reads PyTorch ``.pth`` checkpoints into NumPy arrays, without torch.

Two on-disk layouts exist:

* **Legacy** (``torch.save`` before PyTorch 1.6, and the offline
  ``mobilenet_v2-b0353104.pth``): a pickled magic number, a protocol
  version and a system-info dict, then the pickled object whose tensors
  refer to storages by *persistent id*, then a pickled list of storage keys,
  then for each key an ``int64`` element count followed by the raw
  little-endian storage bytes.
* **Zip** (PyTorch 1.6 and later, current torchvision downloads): a zip
  archive holding ``<root>/data.pkl`` (same persistent-id scheme) and one
  raw file per storage, ``<root>/data/<key>``.

Only a small allow-list of globals is resolved by the unpickler
(``collections.OrderedDict``, torch's tensor-rebuild helpers and storage
types), so loading a file never imports torch and never runs code named in
the file.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": None,  # no NumPy dtype; read as uint16 then widened
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

_DTYPE_NAMES = {  # torch.<dtype> globals used by torch>=2 (UntypedStorage).
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": None, "int64": np.int64, "int32": np.int32,
    "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class TorchCheckpointError(ValueError):
  """The file is not a PyTorch checkpoint this reader understands."""


@dataclasses.dataclass
class _Storage:
  """A torch storage: ``numel`` elements of ``dtype``, filled in later.

  A view (legacy files only) has a ``base`` storage and an element offset.
  """

  name: str
  dtype: Any  # a NumPy dtype, or None for bfloat16
  numel: int
  data: np.ndarray | None = None
  base: _Storage | None = None
  offset: int = 0

  def view(self, offset: int, size: int) -> _Storage:
    return _Storage(self.name, self.dtype, size, base=self, offset=offset)

  def resolved(self) -> np.ndarray:
    if self.base is not None:
      return self.base.resolved()[self.offset:self.offset + self.numel]
    if self.data is None:
      raise TorchCheckpointError(f"storage {self.name!r} was never read")
    return self.data


@dataclasses.dataclass
class _LazyTensor:
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]

  def materialize(self) -> np.ndarray:
    flat = self.storage.resolved()
    if not self.size:
      return np.array(flat[self.offset])
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=tuple(s * itemsize for s in self.stride), writeable=False)
    return np.array(view, order="C")  # a C-contiguous copy


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _StorageType:
  """Stands for ``torch.FloatStorage`` & co. in a persistent id."""

  def __init__(self, name: str, dtype):
    self.name = name
    self.dtype = dtype


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals a state dict needs; storages are lazy."""

  def __init__(self, file, storages: dict[str, _Storage]):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor",
                                             "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name, _STORAGE_DTYPES[name])
    if module == "torch" and name in _DTYPE_NAMES:
      return _StorageType(name, _DTYPE_NAMES[name])
    if module == "torch" and name == "Size":
      return tuple
    raise TorchCheckpointError(
        f"refusing to load global {module}.{name}: only state dicts of "
        "tensors are supported (no pickled modules or code).")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise TorchCheckpointError(f"unsupported persistent id {pid!r}")
    storage_type, key, _location, numel = pid[1:5]
    view_metadata = pid[5] if len(pid) > 5 else None
    key = str(key)
    storage = self._storages.get(key)
    if storage is None:
      if not isinstance(storage_type, _StorageType):
        raise TorchCheckpointError(f"unsupported storage type {storage_type}")
      storage = _Storage(storage_type.name, storage_type.dtype, int(numel))
      self._storages[key] = storage
    if view_metadata is not None:
      _view_key, offset, view_size = view_metadata
      return storage.view(int(offset), int(view_size))
    return storage


def _decode(raw: bytes, storage: _Storage, count: int) -> np.ndarray:
  if storage.dtype is None:  # bfloat16: the high half of a float32
    words = np.frombuffer(raw, "<u2", count=count)
    return (words.astype(np.uint32) << 16).view(np.float32)
  dtype = np.dtype(storage.dtype).newbyteorder("<")
  return np.frombuffer(raw, dtype, count=count).astype(
      np.dtype(storage.dtype), copy=True)


def _itemsize(storage: _Storage) -> int:
  return 2 if storage.dtype is None else np.dtype(storage.dtype).itemsize


def _materialize(obj):
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_materialize(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v) for v in obj)
  return obj


def _load_legacy(f: BinaryIO):
  if pickle.load(f) != _LEGACY_MAGIC:
    raise TorchCheckpointError("not a PyTorch checkpoint (bad magic number)")
  if pickle.load(f) != _LEGACY_PROTOCOL:
    raise TorchCheckpointError("unsupported legacy protocol version")
  sys_info = pickle.load(f)
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise TorchCheckpointError("big-endian checkpoints are not supported")
  storages: dict[str, _Storage] = {}
  obj = _Unpickler(f, storages).load()
  keys = pickle.load(f)
  for key in keys:
    storage = storages[str(key)]
    (count,) = struct.unpack("<q", f.read(8))
    if count != storage.numel:
      # Some writers store the byte count instead of the element count.
      if count == storage.numel * _itemsize(storage):
        count = storage.numel
      else:
        raise TorchCheckpointError(
            f"storage {key}: {count} elements on disk, {storage.numel} "
            "expected")
    nbytes = count * _itemsize(storage)
    raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise TorchCheckpointError("truncated checkpoint")
    storage.data = _decode(raw, storage, count)
  return obj


def _load_zip(path_or_file):
  with zipfile.ZipFile(path_or_file) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if not pkl:
      raise TorchCheckpointError("zip checkpoint without data.pkl")
    root = pkl[0][:-len("data.pkl")]
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), storages).load()
    for key, storage in storages.items():
      raw = zf.read(f"{root}data/{key}")
      count = len(raw) // _itemsize(storage)
      storage.data = _decode(raw, storage, count)
  return obj


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
  """Loads a ``.pth`` file (legacy or zip layout) with tensors as NumPy arrays.

  Args:
    path: The checkpoint file.

  Returns:
    The pickled object (usually a ``{name: np.ndarray}`` state dict, or a dict
    holding one under ``"state_dict"``), with every tensor converted to a
    contiguous ``np.ndarray`` of the tensor's dtype (bfloat16 widened to
    float32).

  Raises:
    TorchCheckpointError: for files that are not PyTorch checkpoints, or that
      pickle anything but tensors in dicts, lists and tuples.

  Example::

    from lowrank_vjp.models import load_torch_checkpoint, mobilenet_v2_weights
    sd = load_torch_checkpoint(mobilenet_v2_weights())
    sd["features.0.0.weight"].shape     # (32, 3, 3, 3)
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _materialize(_load_zip(path))
  with open(path, "rb") as f:
    try:
      return _materialize(_load_legacy(f))
    except (pickle.UnpicklingError, EOFError) as e:
      raise TorchCheckpointError(
          f"{path}: not a PyTorch checkpoint ({e})") from e


def state_dict(checkpoint: Any) -> dict[str, np.ndarray]:
  """The ``{name: array}`` state dict inside a loaded checkpoint.

  Accepts a bare state dict or one wrapped as ``{"state_dict": ...}`` /
  ``{"model": ...}`` (as MCUNet's and many training scripts' files are).
  A ``"module."`` prefix (from ``DataParallel``) is removed.
  """
  if isinstance(checkpoint, dict):
    for wrapper in ("state_dict", "model", "model_state_dict"):
      inner = checkpoint.get(wrapper)
      if isinstance(inner, dict):
        checkpoint = inner
        break
  if not isinstance(checkpoint, dict) or not all(
      isinstance(v, np.ndarray) for v in checkpoint.values()):
    raise TorchCheckpointError("the checkpoint holds no state dict of tensors")
  out = {}
  for k, v in checkpoint.items():
    out[k[len("module."):] if k.startswith("module.") else k] = v
  return out
