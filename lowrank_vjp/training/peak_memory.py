"""The memory a user sees: a whole training step's peak, and the largest batch.

Every step here is built as train.py builds its own
(:func:`~lowrank_vjp.training.make_train_step`: SGD with momentum, state
donated, every conv trained through a :mod:`lowrank_vjp.rules` plan) and
judged by XLA's estimated peak (argument + output + temp − alias) of the
compiled program; nothing is run. Models: :class:`ResidualCNN` (the
ResNet-style CNN the issue measured: 9 residual blocks of 3×3 convolutions
and :func:`lowrank_vjp.relu`, no BatchNorm) and the pretrained-compatible
models of :mod:`lowrank_vjp.models` (random weights: shapes are what count),
trained whole (``k = "all"``) or in their last ``k`` conv layers.

Layers run at their configured rank capacities (the default rank fraction),
not at the rungs a rank controller would settle on after some steps; the
train.py report gives the latter for one run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import lowrank_vjp as lv
import lowrank_vjp.rules as lvr
from lowrank_vjp.training import step as step_lib
from lowrank_vjp.training.config import TrainConfig
from lowrank_vjp.training.model import build_model
from lowrank_vjp.training.optim import make_optimizer

METHODS: dict[str, dict[str, Any]] = {
    "vanilla": {"method": "none"},
    "checkpoint": {"method": "checkpoint"},
    "hosvd": {"method": "hosvd", "eps": 0.9},
    "svd": {"method": "svd", "eps": 0.9},
    "asi": {"method": "asi"},
    "quant-8": {"method": "quant", "bits": 8},
    "quant-4": {"method": "quant", "bits": 4},
    "gradfilter": {"method": "gradfilter"},
}
"""Rows of the tables: name -> settings of every compressed layer."""

REMAT = "hosvd+remat"
"""HOSVD inside per-block ``nn.remat`` saving only compressed residuals
(:func:`lowrank_vjp.save_compressed_residuals`); :class:`ResidualCNN`
only."""


class _Block(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    h = lv.relu(nn.Conv(self.features, (3, 3))(x))
    return lv.relu(x + nn.Conv(self.features, (3, 3))(h))


class ResidualCNN(nn.Module):
  """A ResNet-style CNN: a stem, 9 residual blocks in 3 stages, a head.

  Widths 16, 32, 64 (a strided 3×3 conv between stages), 3×3 convolutions
  with :func:`lowrank_vjp.relu`, no BatchNorm; 19 conv layers and a Dense.

  Attributes:
    num_classes: Outputs of the head.
    remat: Each block under ``nn.remat`` with
      :func:`lowrank_vjp.save_compressed_residuals`.
  """

  num_classes: int = 10
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    block = (nn.remat(_Block, policy=lv.save_compressed_residuals())
             if self.remat else _Block)
    x = lv.relu(nn.Conv(16, (3, 3))(x))
    for features in (16, 32, 64):
      if x.shape[-1] != features:
        x = lv.relu(nn.Conv(features, (3, 3), strides=2)(x))
      for _ in range(3):
        x = block(features)(x)
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class Setting:
  """One table: which model, which layers, which images.

  Attributes:
    model: ``"cnn"`` (:class:`ResidualCNN`) or a name of
      :data:`lowrank_vjp.models.MODELS`.
    k: ``"all"`` or the number of last conv layers trained.
    image_size: Side of the input images.
    train_bn: BatchNorms of the trained layers in training mode (else
      frozen).
    dtype: The step's compute dtype (``"float32"``, ``"bfloat16"``,
      ``"float16"``: :mod:`lowrank_vjp.training.precision`).
  """

  model: str
  k: str = "all"
  image_size: int = 224
  train_bn: bool = False
  dtype: str = "float32"

  def label(self) -> str:
    bn = ", BN trained" if self.train_bn else ""
    dtype = "" if self.dtype == "float32" else f", {self.dtype}"
    return (f"{self.model}, k = {self.k}, {self.image_size}×"
            f"{self.image_size}{bn}{dtype}")


def make_step(setting: Setting, name: str, batch: int, *,
              concrete: bool = False) -> tuple[Callable, tuple]:
  """``(jitted step, example arguments)`` of one method at one batch size.

  Args:
    setting: The model and its trained layers.
    name: A key of :data:`METHODS`, or :data:`REMAT`.
    batch: The batch size.
    concrete: Arrays instead of shapes (the variables, ASI factors and
      optimizer state built, jitted; random images and labels), to run the
      very program the peak tables compile.

  Returns:
    What :func:`lowrank_vjp.measure.max_batch` asks of ``make_step``: the
    donated step of :func:`~lowrank_vjp.training.make_train_step` and its
    arguments as ``jax.ShapeDtypeStruct`` s (arrays with ``concrete``).
  """
  build = ((lambda fn, *a: jax.jit(fn)(*a)) if concrete
           else jax.eval_shape)
  if name not in METHODS and name != REMAT:
    raise ValueError(f"unknown method {name!r}; known: "
                     f"{list(METHODS) + [REMAT]}")
  remat = name == REMAT
  settings = METHODS["hosvd" if remat else name]
  size = setting.image_size
  config = TrainConfig(model="mobilenet_v2" if setting.model == "cnn"
                       else setting.model, weights="none",
                       batch_size=batch, image_size=size,
                       train_bn=setting.train_bn)
  if setting.model == "cnn":
    model = ResidualCNN(remat=remat)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = build(lambda: model.init(
        jax.random.key(0), jnp.zeros(x.shape, x.dtype)))
    images, image_size = x, None
    head, exclude = "Dense_0", None
  else:
    if remat:
      raise ValueError(f"{REMAT} is measured on the cnn only")
    model, variables, spec, _ = build_model(config, 10, lambda *_: None)
    if not concrete:
      variables = jax.eval_shape(lambda: variables)
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    image_size = size
    head, exclude = spec.head, spec.exclude
  layers = lvr.discover(model, x, variables=variables, train=True)
  if setting.k == "all":  # every convolution, downsampling ones included
    k, exclude = sum(1 for l in layers if l.kind == "conv"), None
  else:                   # the papers' count
    k = int(setting.k)
  rules = lvr.fine_tune_last(layers, k, settings, exclude=exclude, head=head,
                             train_bn=setting.train_bn)
  plan = lvr.make_plan(layers, rules)
  tx = make_optimizer(config)
  trained, frozen = plan.split(variables)
  dtype = setting.dtype
  asi = build(lambda v: step_lib.init_asi_state(model, plan, v, x, dtype),
              variables)
  state = build(lambda t, a: step_lib.initial_state(t, tx, a, dtype),
                trained, asi)
  step = step_lib.make_train_step(model, plan, tx, 0, image_size,
                                  dtype=dtype)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  if concrete:
    keys = jax.random.split(jax.random.key(1))
    images = (jax.random.randint(keys[0], images.shape, 0, 256).astype(
        images.dtype) if jnp.issubdtype(images.dtype, jnp.integer)
              else jax.random.normal(keys[0], images.shape, images.dtype))
    labels = jax.random.randint(keys[1], labels.shape, 0, 10, jnp.int32)
  return step, (state, frozen, images, labels)


def peak_bytes(setting: Setting, name: str, batch: int) -> int:
  """XLA's estimated peak of one method's compiled step."""
  step, args = make_step(setting, name, batch)
  return lv.measure.xla_memory(step, *args).peak_bytes


def peaks(setting: Setting, names: Sequence[str], batches: Sequence[int]
          ) -> dict[str, dict[int, int]]:
  """``{method: {batch: estimated peak bytes}}``."""
  return {n: {b: peak_bytes(setting, n, b) for b in batches} for n in names}


def max_batches(setting: Setting, names: Sequence[str], budget_bytes: int,
                start: int = 1, limit: int = 1 << 12, tolerance: float = 0.0
                ) -> dict[str, lv.measure.MaxBatch]:
  """``{method: lowrank_vjp.measure.MaxBatch}`` under ``budget_bytes``."""
  return {n: lv.measure.max_batch(
      lambda b, n=n: make_step(setting, n, b), budget_bytes, start=start,
      limit=limit, tolerance=tolerance) for n in names}


# ---------------------------------------------------------------- page ---

MiB = float(2**20)


def peak_rows(peak_bytes: dict[str, int], label: str) -> list[str]:
  """A Markdown table of peaks, with vanilla's over each row's."""
  lines = [f"| {label} | peak MiB | vanilla / {label} |", "|---|---|---|"]
  base = peak_bytes.get("vanilla")
  for name, peak in peak_bytes.items():
    ratio = "" if not base else f"{base / peak:.2f}×"
    lines.append(f"| {name} | {peak / MiB:.1f} | {ratio} |")
  return lines


def batch_rows(table: dict, label: str) -> list[str]:
  """A Markdown table of largest batches (with compiles when recorded)."""
  compiles = table.get("compiles")
  extra = (" compiles |", "---|") if compiles else ("", "")
  lines = [f"| {label} | batch | its peak MiB | batch / vanilla's |"
           + extra[0], "|---|---|---|---|" + extra[1]]
  base = table["batch"].get("vanilla")
  for name, batch in table["batch"].items():
    ratio = "" if not base else f"{batch / base:.2f}×"
    row = (f"| {name} | {batch} | {table['peak_bytes'][name] / MiB:.1f} | "
           f"{ratio} |")
    lines.append(row + (f" {compiles[name]} |" if compiles else ""))
  return lines


def page(result: dict) -> str:
  """docs/benchmarks/peak_memory.md from a result of experiments/peak_memory.py.

  Every figure and every ratio is computed from ``result``; nothing is
  written in advance. A largest-batch table's ``"note"`` (for example,
  that it was kept from a run on older code) is printed under it.
  """
  e = result["environment"]
  lines = [
      "# Whole-step peak and the largest batch", "",
      "Generated by `" + result["command"] + "` (" +
      f"{result['wall_s'] / 60:.0f} min in all) on {e['machine']} "
      f"({e['device']}), jax {e['jax']}, flax {e['flax']}, {e['date']}" +
      "".join(f"; resumed by `{r['command']}` on {r['environment']['date']}"
              for r in result.get("resumed", ())) + ".", "",
      "Each figure is XLA's estimated peak (argument + output + temp − "
      "alias) of the compiled training step, built as train.py builds it "
      "(SGD with momentum, parameters and optimizer state donated, every "
      "listed conv trained through a `lowrank_vjp.rules` plan) at the "
      "default rank capacities; nothing is run. The ratio is vanilla's peak "
      "over the method's. On the CPU `jax.checkpoint` changes little: "
      "XLA:CPU removes the barrier that keeps recomputation from being "
      "merged back into the forward pass.", ""]
  if any("BN trained" in t["setting"] for t in result["peaks"]):
    lines += ["\"BN trained\": the BatchNorms after the trained convolutions "
              "run in training mode and are trained. Under a compressing "
              "method they are `lv.batch_norm` keeping 8-bit per-channel "
              "codes of x̂ (`lv.rules.Rule.bn_method`'s default); under "
              "vanilla and checkpoint they are Flax's own `nn.BatchNorm`.", ""]
  if result.get("partial"):
    lines += ["**Partial: the run stopped before every table was measured.**",
              ""]
  gpu = result.get("gpu")
  lines += (["GPU rows: none — no GPU was available to this run. The "
             "GPU runs of experiments/gpu_run.py (the allocator's peak in "
             "fresh processes beside XLA's estimate) are in "
             "docs/benchmarks/gpu/README.md."]
            if not gpu else ["GPU rows: see the allocator section below."])
  lines.append("")
  for table in result["peaks"]:
    lines += [f"## Peak at batch {table['batch']}: {table['setting']}", ""]
    lines += peak_rows(table["peak_bytes"], "method") + [""]
  for table in result["max_batch"]:
    budget = table["budget_bytes"] / MiB
    lines += [f"## Largest batch under {budget:.0f} MiB: {table['setting']}",
              ""] + batch_rows(table, "method")
    tol = table.get("tolerance", 0.0)
    if tol:
      lines += ["", f"Bisection stopped within {tol:.0%} of the largest "
                "fitting batch (`max_batch(..., tolerance=...)`): each batch "
                "fits; a slightly larger one may too."]
    if table.get("note"):
      lines += ["", "**" + table["note"] + "**"]
    lines.append("")
  if result.get("curve"):
    curve = result["curve"]
    lines += [f"## Peak against batch: {curve['setting']}", "",
              "![peak against batch](peak_vs_batch.png)", "",
              "| method | " + " | ".join(f"b = {b}" for b in curve["batches"])
              + " |", "|---" * (len(curve["batches"]) + 1) + "|"]
    for name, row in curve["peak_bytes"].items():
      lines.append(f"| {name} | " + " | ".join(
          f"{row[str(b)] / MiB:.0f}" for b in curve["batches"]) + " |")
    lines.append("")
  return "\n".join(lines)


def plot(curve: dict, path: str) -> str | None:
  """Peak MiB against batch size, one line per method; the PNG's path."""
  from lowrank_vjp.training import plots  # pylint: disable=g-import-not-at-top
  plt = plots.pyplot()
  if plt is None:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, row in curve["peak_bytes"].items():
    ax.plot(curve["batches"], [row[str(b)] / MiB for b in curve["batches"]],
            marker="o", label=name, linewidth=2.5 if name == "vanilla" else 1)
  ax.set_xlabel("batch size")
  ax.set_ylabel("XLA estimated peak (MiB)")
  ax.set_title(curve["setting"], fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
