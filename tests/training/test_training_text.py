"""The byte-level corpus of the Python standard library's sources."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from lowrank_vjp.training import text

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("importlib_resources")


def _tree(root, files):
  for rel, body in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(body)


FILES = {f"pkg/mod_{i}.py": (f"# module {i}\n" * (60 + 7 * i)).encode()
         for i in range(30)}
FILES.update({"site-packages/x.py": b"skip me\n", "test/test_a.py": b"no\n",
              "README.txt": b"not python\n", "top.py": b"x = 1\n\n\n"})


def test_files_skip_tests_site_packages_and_non_python(tmp_path):
  _tree(str(tmp_path), FILES)
  files = text.source_files(str(tmp_path))
  assert files == sorted(files)
  assert "top.py" in files and "pkg/mod_3.py" in files
  assert not any(f.startswith(("site-packages", "test/")) for f in files)
  assert not any(f.endswith(".txt") for f in files)


def test_the_split_is_fixed_by_path_and_partitions_the_files(tmp_path):
  _tree(str(tmp_path), FILES)
  val = [f for f in text.source_files(str(tmp_path))
         if text.is_validation(f)]
  assert val == [f for f in text.source_files(str(tmp_path))
                 if zlib.crc32(f.encode()) % 10 == 0]
  train_b = text.split_bytes("train", str(tmp_path))
  val_b = text.split_bytes("validation", str(tmp_path))
  # Every file in exactly one split, each ending in one newline.
  whole = sum(len(FILES[f].rstrip(b"\n")) + 1
              for f in text.source_files(str(tmp_path)))
  assert len(train_b) + len(val_b) == whole
  with pytest.raises(ValueError, match="split must be"):
    text.split_bytes("test", str(tmp_path))


def test_the_real_standard_library_is_a_real_corpus():
  files = text.source_files()
  assert len(files) > 200 and "os.py" in files
  share = np.mean([text.is_validation(f) for f in files])
  assert 0.04 < share < 0.2


def test_windows_overlap_by_one_byte():
  stream = bytes(range(256)) * 10
  ws = list(text.windows(stream, chunk=100))
  assert len(ws) == (len(stream) - 1) // 100
  assert all(len(w) == 101 for w in ws)
  assert ws[1][0] == ws[0][-1] == stream[100]


def test_text_split_serves_shifted_windows():
  row = np.arange(1025) % 256
  split = text.TextSplit([{"bytes": row}, {"bytes": row[::-1]}], seq_len=300)
  assert len(split) == 2 * 3 and split.tokens == 6 * 300
  x, y = split.get([0, 2, 3])
  assert x.shape == y.shape == (3, 300) and x.dtype == np.int32
  np.testing.assert_array_equal(x[1], row[600:900])
  np.testing.assert_array_equal(y[1], row[601:901])
  np.testing.assert_array_equal(x[2], row[::-1][:300])
  assert sorted(np.concatenate([split.batch_indices(s, 3, 0)
                                for s in (0, 1)]).tolist()) == list(range(6))


@pytest.mark.parametrize("seq_len", [0, 1025])
def test_text_split_rejects_lengths_beyond_the_window(seq_len):
  with pytest.raises(ValueError, match=r"seq_len must be in \[1, 1024\]"):
    text.TextSplit([{"bytes": np.zeros(1025, np.uint8)}], seq_len)


def test_text_split_has_no_images():
  split = text.TextSplit([{"bytes": np.zeros(1025, np.uint8)}], 8)
  with pytest.raises(ValueError, match="image_size must be None"):
    split.get([0], image_size=32)


def test_builder_round_trip_through_tfds(tmp_path):
  from lowrank_vjp.training import tfds_builders  # pylint: disable=g-import-not-at-top
  src = tmp_path / "lib"
  _tree(str(src), FILES)

  class Small(tfds_builders.PythonStdlibText):
    SOURCE_DIR = str(src)

  b = Small(data_dir=str(tmp_path / "tfds"), file_format="array_record")
  b.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  assert b.builder_config.name == text.config_name()
  stream = text.split_bytes("train", str(src))
  source = b.as_data_source(split="train")
  assert len(source) == len(list(text.windows(stream)))
  stored = {bytes(np.asarray(source[i]["bytes"])) for i in range(len(source))}
  expected = {bytes(w) for w in text.windows(stream)}
  assert stored == expected
