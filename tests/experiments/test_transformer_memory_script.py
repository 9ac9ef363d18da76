"""experiments/transformer_memory.py --quick writes its page and JSON."""

from __future__ import annotations

import json


def test_quick_run_writes_page_and_json(script, tmp_path):
  result = script("transformer_memory").main(["--quick", "--out",
                                              str(tmp_path)])
  saved = json.loads((tmp_path / "transformer_memory.json").read_text())
  assert saved["peaks"] == result["peaks"]
  page = (tmp_path / "transformer_memory.md").read_text()
  assert "## Peak at batch 2" in page and "Largest batch" not in page
  peaks = result["peaks"][0]["peak_bytes"]
  assert peaks["+ lv.flax.LayerNorm codes"] < peaks["vanilla"]
