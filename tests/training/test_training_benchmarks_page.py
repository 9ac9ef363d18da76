"""lowrank_vjp.training.benchmarks_page: docs/benchmarks.md from results."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from lowrank_vjp.training import benchmarks_page

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "docs")


def test_a_page_without_results_says_what_to_run(tmp_path):
  page = str(tmp_path / "benchmarks.md")
  benchmarks_page.write(str(tmp_path), page)
  text = open(page).read()
  for part in ("memory", "accuracy", "variance", "speed"):
    assert ("Not measured yet: run `python experiments/paper_benchmarks.py "
            f"{part}`.") in text


def test_the_committed_page_is_rendered_from_the_committed_results(tmp_path):
  pytest.importorskip("matplotlib")
  results = os.path.join(DOCS, "benchmarks")
  if not os.path.isdir(results):
    pytest.skip("no docs/benchmarks results")
  for name in os.listdir(results):
    if name.endswith(".json"):
      shutil.copy(os.path.join(results, name), tmp_path)
  if os.path.isdir(os.path.join(results, "gpu")):   # the GPU runs' rows
    shutil.copytree(os.path.join(results, "gpu"), tmp_path / "gpu")
  page = str(tmp_path / "benchmarks.md")
  benchmarks_page.write(str(tmp_path), page)
  with open(os.path.join(DOCS, "benchmarks.md")) as f:
    assert open(page).read() == f.read()
  for png in ("pareto.png", "ranks_vs_eps.png", "ranks_over_steps.png"):
    assert os.path.getsize(tmp_path / png) > 0


# ----------------------------------------- derived sentences must flip ---

ENV = {"date": "2026-01-01", "device": "cpu:cpu", "machine": "x86_64",
       "jax": "0", "flax": "0", "python": "3"}


def _result(**kw):
  return dict(environment=ENV, command="python experiments/x.py",
              wall_s=60.0, partial=False, **kw)


def _memory(tail, whole):
  """One MobileNetV2 k = 2 table: method -> (tail MiB, whole MiB)."""
  cells = [dict(model="mobilenet_v2", k=2, method=m, pretrained=True,
                analytic_peak_mib=1.0, analytic_mean_mib=1.0,
                capacity_mib=1.0, xla_tail_peak_mib=tail[m],
                xla_whole_peak_mib=whole[m]) for m in tail]
  return _result(setting=dict(batch=4, image_size=32, steps=2,
                              dataset="d"), cells=cells)


def _text(lines):
  return "\n".join(lines)


@pytest.mark.parametrize("hosvd_tail,negative", [(40.0, True), (20.0, False)])
def test_negative_savings_are_listed_only_when_there_are_some(hosvd_tail,
                                                              negative):
  text = _text(benchmarks_page.memory_section(_memory(
      {"vanilla": 30.0, "HOSVD ε=0.9": hosvd_tail},
      {"vanilla": 300.0, "HOSVD ε=0.9": 300.0})))
  assert ("Negative savings here: HOSVD ε=0.9 (MobileNetV2 k = 2)."
          in text) == negative
  assert ("No saving is negative here." in text) == (not negative)


@pytest.mark.parametrize("vanilla_whole,prefix_sets_it", [(300.0, True),
                                                           (40.0, False)])
def test_the_prefix_sets_the_whole_figure_only_when_its_share_is_larger(
    vanilla_whole, prefix_sets_it):
  # Tail saving 25 MiB; the prefix's share is vanilla whole − tail.
  text = _text(benchmarks_page.memory_section(_memory(
      {"vanilla": 30.0, "SVD ε=0.9": 5.0},
      {"vanilla": vanilla_whole, "SVD ε=0.9": vanilla_whole - 1.0})))
  share = vanilla_whole - 30.0
  assert f"held {share:.0f}–{share:.0f} MiB higher peak" in text
  assert "largest tail saving of any method is 25.0 MiB" in text
  assert ("the frozen prefix, not the trained layers, sets the "
          "whole-network figure" in text) == prefix_sets_it
  assert ("In MobileNetV2 k = 2 a tail saving reaches the prefix's share"
          in text) == (not prefix_sets_it)


def _accuracy(seeds, all_seeds=1):
  runs = [dict(k="4", method="vanilla", seed=s, accuracy=0.8 + 0.01 * s,
               analytic_peak_mib=2.0, step_time_median_s=0.1, wall_s=60.0)
          for s in range(seeds)]
  runs += [dict(k="all", method="vanilla", seed=s, accuracy=0.9,
                analytic_peak_mib=100.0, step_time_median_s=1.0,
                wall_s=600.0) for s in range(all_seeds)]
  return _result(setting=dict(
      model="mobilenet_v2", pretrained=True, dataset="d", image_size=32,
      batch=4, steps=2, eval_examples=10, optimizer="SGD",
      all_seeds=all_seeds, all_methods=["vanilla"]), runs=runs)


@pytest.mark.parametrize("seeds", [1, 3])
def test_a_single_seed_prints_its_value_without_a_spread(tmp_path, seeds):
  text = _text(benchmarks_page.accuracy_section(_accuracy(seeds),
                                                str(tmp_path)))
  # k = all always has one seed here.
  assert "90.00 (1 seed) · 100 MiB" in text
  assert "± 0.00 (1)" not in text
  if seeds == 1:
    assert "80.00 (1 seed) · 2 MiB" in text
  else:
    assert "81.00 ± 0.82 (3) · 2 MiB" in text
  assert "(1 seed, methods vanilla; a run took a median 10.0 min at " \
         "k = all against 1.0 min at k = 4)" in text


def _speed(layers, step, device="cpu:cpu"):
  """Rows from {label: (eps, step_s[, repeats])}; vanilla's is the base."""
  def rows(times):
    base = times["vanilla"][1]
    out = []
    for label, (eps, t, *repeats) in times.items():
      row = dict(method=label.split()[0], eps=eps, step_s=t,
                 step_ratio=t / base)
      if repeats:
        row["step_times_s"] = repeats[0]
      out.append(row)
    return out
  sections = {"layers": dict(setting="s", batch=64, size=7,
                             rows=rows(layers))}
  if step is not None:
    sections["step"] = dict(setting="s", batch=64, size=224,
                            rows=rows(step))
  return dict(_result(sections=sections),
              environment=dict(ENV, device=device))


def test_eps_rows_without_repeats_say_they_cannot_tell_noise():
  text = _text(benchmarks_page.speed_section(_speed(
      {"vanilla": (None, 1.0), "hosvd 0.8": (0.8, 1.10),
       "hosvd 0.9": (0.9, 1.21)}, None)))
  assert "differ by 10.0 % (hosvd, the four convolutions)" in text
  assert "cannot tell whether these differences are noise" in text
  assert "differ by noise" not in text


@pytest.mark.parametrize("repeats,within", [
    ((1.0, 1.3, 1.1), True),      # spread 27 % > 10 % difference
    ((1.09, 1.1, 1.11), False)])  # spread 2 % < 10 % difference
def test_eps_rows_are_called_noise_only_within_their_repeats_spread(
    repeats, within):
  text = _text(benchmarks_page.speed_section(_speed(
      {"vanilla": (None, 1.0), "hosvd 0.8": (0.8, 1.1, repeats),
       "hosvd 0.9": (0.9, 1.21, repeats)}, None)))
  assert ("Each is within the spread" in text) == within
  assert ("Larger than the spread of the repeats: hosvd, the four "
          "convolutions (10.0 % > " in text) == (not within)


@pytest.mark.parametrize("ratio,below", [(1.5, True), (5.0, False)])
def test_hosvd_against_the_papers_slowdown(ratio, below):
  text = _text(benchmarks_page.speed_section(_speed(
      {"vanilla": (None, 1.0), "hosvd": (0.8, ratio)}, None)))
  assert f"HOSVD's step took {ratio:.2f}× (the four convolutions)" in text
  side = "below" if below else "not below"
  assert f"vanilla's here, {side} the paper's 4.29× average" in text


@pytest.mark.parametrize("layers_vanilla,dominates", [(0.5, True),
                                                       (8.0, False)])
def test_whole_step_share_of_the_trained_layers(layers_vanilla, dominates):
  text = _text(benchmarks_page.speed_section(_speed(
      {"vanilla": (None, layers_vanilla),
       "svd": (0.9, 2 * layers_vanilla)},
      {"vanilla": (None, 10.0), "svd": (0.9, 10.5)})))
  assert ("In the whole step every method's time is within 5.0 % of "
          "vanilla's (ratios 1.00–1.05)") in text
  share = layers_vanilla / 10.0
  assert f"is {100 * share:.1f} % of the whole step's" in text
  assert f"would land at 1.00–{1 + share:.2f}" in text
  assert ("the rest of the step (the frozen forward pass, the head, the "
          "optimizer) dominates" in text) == dominates
  assert "every method lands near 1" not in text


@pytest.mark.parametrize("device,rerun", [("cpu:cpu", True),
                                          ("gpu:NVIDIA H200", False)])
def test_a_gpu_rerun_is_asked_for_only_after_a_cpu_run(device, rerun):
  text = _text(benchmarks_page.speed_section(_speed(
      {"vanilla": (None, 1.0)}, None, device=device)))
  assert f"Only {device} was measured here." in text
  assert ("A GPU row needs a run of `experiments/gpu_lease.sh`" in text
          ) == rerun
  assert "2.7 s" not in text


def test_the_ranks_over_steps_caption_names_the_runs_that_kept_ranks(
    tmp_path):
  pytest.importorskip("matplotlib")
  accuracy = _accuracy(2)
  accuracy["runs"][1]["ranks_per_step"] = {"conv": [[1, 2], [2, 2]]}
  variance = _result(setting=dict(model="resnet18", batch=4, image_size=32,
                                  pretrained=False, dataset="d"),
                     shapes={"conv": [4, 8]},
                     ranks_vs_eps={"0.8": {"conv": [1, 2]},
                                   "0.9": {"conv": [2, 2]}})
  text = _text(benchmarks_page.variance_section(variance, accuracy,
                                                str(tmp_path)))
  assert "through ResNet18's (random) last 1 conv inputs" in text
  assert ("accuracy runs that kept them (vanilla, k = 4, seed 1):"
          in text)


def _gpu_run(hosvd_ratio, partial=False):
  """gpu_run.py's result with a step and a layers section."""
  def rows(ratio, key):
    return [{key: "vanilla", "step_s": 0.004, "step_ratio": 1.0},
            {key: "hosvd-0.9", "step_s": 0.004 * ratio, "step_ratio": ratio},
            {key: "quant-8", "step_s": 0.005, "step_ratio": 1.25},
            {key: "asi", "error": "not finished"}]
  layers = rows(2 * hosvd_ratio, "name")
  for r in layers:
    r["method"] = r["name"].split("-")[0]
  env = {"device": "gpu:NVIDIA H200", "date": "2026-01-02", "jax": "1",
         "jaxlib": "1", "cuda": {"nvidia_driver": "580"}}
  return {"environment": env, "command": "experiments/gpu_run.sh",
          "wall_s": 100.0, "partial": partial, "smoke": False,
          "sections": {"step": {"setting": "m", "batch": 64,
                                "rows": rows(hosvd_ratio, "method")},
                       "layers": {"setting": "l", "rows": layers}}}


@pytest.mark.parametrize("ratio,within", [(1.05, True), (8.41, False)])
def test_gpu_rows_sit_beside_the_cpu_rows(tmp_path, ratio, within):
  (tmp_path / "gpu").mkdir()
  with open(tmp_path / "gpu" / "nvidia-h200_2026-01-02.json", "w") as f:
    json.dump(_gpu_run(ratio), f)
  smoke = dict(_gpu_run(99.0), smoke=True)   # smoke runs are left out
  with open(tmp_path / "gpu" / "cpu_2026-01-02_smoke.json", "w") as f:
    json.dump(smoke, f)
  runs = benchmarks_page.gpu_runs(str(tmp_path))
  assert [r["file"] for r in runs] == [
      "benchmarks/gpu/nvidia-h200_2026-01-02.json"]
  text = _text(benchmarks_page.speed_section(_speed(
      {"vanilla": (None, 1.0), "hosvd 0.9": (0.9, 1.12)},
      {"vanilla": (None, 10.0), "hosvd 0.9": (0.9, 10.3)}), runs))
  assert "A GPU row needs a run" not in text
  assert "### On gpu:NVIDIA H200 (2026-01-02)" in text
  # GPU ratio beside the CPU table's ratio of the same (method, eps).
  assert f"| hosvd-0.9 | {4 * ratio:.2f} | {ratio:.2f} | 1.03 |" in text
  assert f"| hosvd-0.9 | {8 * ratio:.2f} | {2 * ratio:.2f} | 1.12 |" in text
  assert "| quant-8 | 5.00 | 1.25 | – |" in text   # no CPU row
  assert "| asi | – | – | – |" in text             # unfinished on the GPU
  side = "within" if within else "above"
  assert (f"HOSVD(0.9)'s whole step took {ratio:.2f}× vanilla's on this GPU "
          f"({side} the 1.10× goal") in text
  assert "**Partial" not in text
