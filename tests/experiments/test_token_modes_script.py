"""experiments/token_modes.py on a fresh, one-block GPT."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("importlib_resources")


def test_prints_and_writes_the_chosen_settings(script, tmp_path, data_dir,
                                              capsys):
  out = tmp_path / "modes.json"
  chosen = ["hosvd eps=0.9, feature", "quant 8-bit per channel"]
  tiny = ["--batch-size", "2", "--seq-len", "16", "--n-layer", "1",
          "--n-embd", "16", "--data-dir", data_dir]
  result = script("token_modes").main(tiny + [
      "--settings", ";".join(chosen), "--out", str(out)])
  assert list(result["rows"]) == chosen
  assert result["source"] == "fresh initialisation"
  with open(out) as f:
    assert json.load(f)["rows"] == result["rows"]
  assert "quant 8-bit per channel" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="unknown"):
    # On the same tiny model: the settings are checked after the data and
    # the model are set up (the full-size defaults took seconds).
    script("token_modes").main(tiny + ["--settings", "hosvd eps=2"])
