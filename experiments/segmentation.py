"""Semantic segmentation with a pretrained MobileNetV2 encoder, fine-tuning
its last k conv layers with compressed activations.

A STAND-IN for VOC / Cityscapes, which cannot be had offline: "digit
canvases", built from real offline data. Each example is a grey canvas
(default 64×64) with 1–3 handwritten digits from scikit-learn's digits
(served through the ``sklearn_digits`` tfds builder of
``lowrank_vjp.training.data``) pasted at random sizes (24–40 px) and places;
the label map gives every pixel the class of the digit covering it (digit +
1, ink above 25 % of the digit's maximum) or 0 for background: 11 classes.
Training canvases are built from the digits' train split, test canvases from
its test split; both are a pure function of the seed and the example index.

Model: ``MobileNetV2(num_classes=None, taps=(3, 6, 13))`` with torchvision's
ImageNet weights as encoder (strides 4, 8, 16 and 32) and a small FPN-style
decoder (1×1 lateral convolutions, upsampling, a 3×3 fusion convolution, a
1×1 classifier, and a refinement at the input's resolution that also reads
the image), trained in full and uncompressed. The encoder's last k
convolutions are fine-tuned with each ``--method`` (at ``--encoder-lr-scale``
times the decoder's rate), the rest frozen. Reports pixel accuracy and mean
IoU, the papers' analytic activation memory of the fine-tuned encoder
layers, XLA's whole-step memory and step times; writes ``report.json`` and
a Markdown table, ``segmentation.md``, to ``--workdir``.

Usage:
  python experiments/segmentation.py                  # vanilla and HOSVD
  python experiments/segmentation.py --method hosvd --eps 0.9 --layers 2
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see train.py

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lowrank_vjp.rules as lvr  # noqa: E402
from lowrank_vjp import training  # noqa: E402
from lowrank_vjp.training import segmentation as seg  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--weights", default="auto")
  p.add_argument("--method", default="vanilla,hosvd")
  p.add_argument("--eps", type=float, default=0.8)
  p.add_argument("--method-kwargs", default="{}")
  p.add_argument("--layers", type=int, default=17,
                 help="fine-tune the encoder's last k conv layers")
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--image-size", type=int, default=64)
  p.add_argument("--lr", type=float, default=2e-3,
                 help="the decoder's peak learning rate (Adam, cosine decay)")
  p.add_argument("--encoder-lr-scale", type=float, default=0.1,
                 help="the encoder's rate relative to --lr")
  p.add_argument("--train-examples", type=int, default=4000)
  p.add_argument("--test-examples", type=int, default=256)
  p.add_argument("--rank-patience", type=int, default=50,
                 help="HOSVD/SVD: steps before a rank capacity may shrink")
  p.add_argument("--rank-headroom", type=float, default=1.0,
                 help="HOSVD/SVD: grow a capacity to the rung holding "
                 "headroom × need")
  p.add_argument("--rank-shrink-every", type=int, default=0,
                 help="HOSVD/SVD: shrink capacities only every this many "
                 "steps, all layers together (0: each when its patience "
                 "runs out)")
  p.add_argument("--rank-background-compile",
                 action=argparse.BooleanOptionalAction, default=True,
                 help="HOSVD/SVD: compile a new capacity setting in the "
                 "background while steps run at a compiled one that holds as "
                 "much")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--workdir", default="workdir_segmentation")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def run_one(args, method, train_set, test_set, log=print) -> dict:
  settings = training.settings_for(method, args)
  label = training.run_label(method, settings)
  model, variables, weights = seg.build_segmentation_net(
      args.weights, args.image_size, args.seed, log)
  shape = (args.batch_size, args.image_size, args.image_size, 3)
  layers = lvr.discover(model, jax.ShapeDtypeStruct(shape, jnp.float32),
                        variables=variables, train=True)
  rules = lvr.fine_tune_last(layers, args.layers, settings,
                             exclude=r"decoder/.*", head=r"decoder/.*")
  plan = lvr.make_plan(layers, rules)
  trained, frozen = plan.split(variables)
  tx = seg.optimizer(args.lr, args.steps, args.encoder_lr_scale)
  state = training.initial_state(trained, tx)
  # HOSVD and SVD keep their ε-ranks in static capacities that a rank
  # controller moves (and recomputes a step that needed more), as train.py.
  controller = training.make_controller(
      plan, patience=args.rank_patience, headroom=args.rank_headroom,
      shrink_every=args.rank_shrink_every)
  step_fn = training.make_train_step(model, plan, tx, args.seed,
                                     args.image_size,
                                     redo_on_overflow=controller is not None)
  batch = lambda s: train_set.batch(
      np.random.default_rng([args.seed, s]).integers(0, len(train_set),
                                                     args.batch_size))
  images, labels = batch(0)
  programs = training.Programs(step_fn, state, frozen, images, labels)
  log(f"[{label}] segmentation, encoder layers fine-tuned:\n"
      + plan.describe())
  rows = []
  steps = range(args.steps)
  if not args.no_progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    steps = tqdm(steps, desc=label, unit="step", file=sys.stdout)
  for s in steps:
    images, labels = batch(s)
    state, metrics, dt, compile_s = training.timed_step(
        programs, controller, state, frozen, images, labels,
        background=args.rank_background_compile)
    loss = training.check_finite(float(metrics["loss"]), f"at step {s}")
    rows.append({"step": s + 1, "loss": loss,
                 "pixel_accuracy": float(metrics["accuracy"]),
                 "step_time_s": dt, "compile_time_s": compile_s,
                 **training.stats_row(metrics["stats"])})
  programs.close(cancel=True)
  xla = programs.most_run()
  os.makedirs(args.workdir, exist_ok=True)
  training.write_metrics(os.path.join(args.workdir, f"{method}.jsonl"), rows)
  final = training.final_variables(plan, state, frozen)
  pixel_acc, miou = seg.scores(seg.confusion(
      model, final, test_set, image_size=args.image_size,
      batch_size=args.batch_size))
  mem = np.asarray([r["activation_memory_analytic_mib"] for r in rows])
  times = np.asarray([r["step_time_s"] for r in rows])
  return {
      "run": label, "task": "digit canvases (stand-in for VOC/Cityscapes)",
      "pretrained_encoder": weights is not None, "settings": settings,
      "layers": list(plan.compressed_paths),
      "trained_layers": list(plan.trainable),
      "accuracy": pixel_acc, "pixel_accuracy": pixel_acc, "mean_iou": miou,
      "activation_memory_analytic_peak_mib": float(mem.max()),
      "activation_memory_analytic_mean_mib": float(mem.mean()),
      "activation_memory_vanilla_mib": rows[-1][
          "activation_memory_vanilla_mib"],
      "xla_device": xla.device,
      "xla_temp_mib": xla.temp_bytes / training.MiB,
      "xla_peak_mib": xla.peak_bytes / training.MiB,
      "step_time_mean_s": float(times.mean()),
      "step_time_median_s": float(np.median(times)),
      "compile_time_s": programs.compile_time,
      "compile_wait_s": programs.wait_s,
      "fallback_steps": programs.fallbacks,
      "compiles": len(programs),
      "steps_below_eps": sum(r["overflow_layers"] > 0 for r in rows),
      "ranks": {p: rows[-1]["ranks"][p] for p in plan.compressed_paths},
  }


def write_reports(workdir, env, command, reports) -> str:
  """Writes report.json and segmentation.md for `reports`; returns the table."""
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump({"environment": env, "command": command, "runs": reports}, f,
              indent=1)
  text = seg.table(reports)
  with open(os.path.join(workdir, "segmentation.md"), "w") as f:
    f.write(f"`{command}`: {env['device']} ({env['machine']}), jax "
            f"{env['jax']}, flax {env['flax']}, {env['date']}.\n\n{text}\n")
  return text


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  digits = training.load("sklearn_digits", args.data_dir)
  train_set = seg.DigitCanvases(digits["train"], args.image_size, args.seed,
                                args.train_examples)
  test_set = seg.DigitCanvases(digits["test"], args.image_size, args.seed + 1,
                               args.test_examples)
  print("Digit-canvas segmentation, a stand-in for VOC/Cityscapes: "
        f"{args.image_size}px canvases of scikit-learn digits, "
        f"{seg.NUM_CLASSES} classes (background + 10 digits).")
  env = training.environment()
  command = "python experiments/segmentation.py " + shlex.join(
      sys.argv[1:] if argv is None else argv)
  reports = []
  for m in training.run_names(args.method):
    # Written after every run, so that a long job stopped part-way keeps
    # the runs it finished.
    reports.append(run_one(args, m, train_set, test_set))
    text = write_reports(args.workdir, env, command, reports)
  print("\n" + text)
  return reports


if __name__ == "__main__":
  main()
