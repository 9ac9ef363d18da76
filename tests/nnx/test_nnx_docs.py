"""docs/nnx.md's quick start runs as written."""

import pathlib
import re

PAGE = pathlib.Path(__file__).parents[2] / "docs" / "nnx.md"


def test_quick_start_runs_and_trains_the_planned_layers(capsys):
  code = re.search(r"```python\n(.*?)```", PAGE.read_text(), re.S).group(1)
  namespace = {}
  exec(compile(code, str(PAGE), "exec"), namespace)  # pylint: disable=exec-used
  stats, plan = namespace["stats"], namespace["plan"]
  assert sorted(stats) == [f"layer4/{b}/conv{c}" for b in (0, 1)
                           for c in (1, 2)]
  assert plan.trainable[-1] == "fc"
  assert namespace["controller"].key() is not None
  assert "layer4/1/conv2" in capsys.readouterr().out
