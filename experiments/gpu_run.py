"""One prepared command for one GPU: step times, allocator peaks, largest batch.

Run it as ``experiments/gpu_run.sh`` (which sets
``XLA_PYTHON_CLIENT_PREALLOCATE=false``) on one NVIDIA H100/H200; it needs
no internet and nothing outside the working tree: every model has random
weights (shapes are what count). It prints each section as it ends and
writes ``<device kind>_<date>.json`` and ``.md`` into ``--out``
(docs/benchmarks/gpu/). Sections, in order; once ``--budget-s`` is spent
the remaining ones are skipped, with a note:

* ``step``: MobileNetV2 at 224×224, batch 64, its last 4 convolutions and
  the classifier trained: the donated SGD-momentum step of
  ``lowrank_vjp.training.peak_memory.make_step`` (train.py's own). Each
  method runs in a fresh process (``XLA_PYTHON_CLIENT_PREALLOCATE=false``):
  it compiles (timed apart), reads XLA's estimated peak (argument + output
  + temp − alias), runs warm-up steps, then timed steps in rounds
  interleaved with the other methods' processes (one process steps at a
  time), then reports the allocator's
  ``memory_stats()['peak_bytes_in_use']``.
* ``layers``: experiments/bench_speed.py's layers section (the last four
  MobileNetV2 convolutions at 7×7, batch 64): forward with its residual
  kept, backward, step, each a median after compile and warm-up.
* ``peak``: MobileNetV2 with every convolution trained, batch 16, one fresh
  process per method: the allocator's peak beside XLA's; then, in the same
  process, the largest batch under ``--budget-mib`` by
  ``lv.measure.max_batch`` (compile-only), started at the batch that an
  affine fit through the measured peak predicts.

``--smoke`` runs the same code on tiny sizes (``peak_memory.ResidualCNN``
at 16 px, batch 2, its last 2 and 1 convolutions trained, two methods, the
layers at 3×3) and writes to a temporary directory: on the
CPU it checks the machinery, not the figures (``memory_stats()`` is None
there, and the allocator peak is reported as unavailable).

Usage:
  experiments/gpu_run.sh                           # on the GPU (≤ 5 min)
  experiments/gpu_run.sh --sections peak --budget-mib 4096
  python experiments/gpu_run.py --smoke            # anywhere, < 1 min
"""

from __future__ import annotations

import os

# Before jax is imported: the parent (layers section) must not take the
# GPU's memory from the fresh processes (they always get "false").
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import queue
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import jax
import numpy as np

import lowrank_vjp as lv
from lowrank_vjp import training
from lowrank_vjp.training import peak_memory as pm
from lowrank_vjp.training import report as report_lib

T0 = time.perf_counter()
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
OUT = os.path.join(ROOT, "docs", "benchmarks", "gpu")
TAG = "@@gpu_run "
MiB = pm.MiB

_settings = training.method_settings
ROWS: dict[str, tuple[tuple[str, float | None] | None, dict]] = {
    "vanilla": (("vanilla", None), _settings("vanilla")),
    "hosvd-0.8": (("hosvd", 0.8), _settings("hosvd", eps=0.8)),
    "hosvd-0.9": (("hosvd", 0.9), _settings("hosvd", eps=0.9)),
    "svd-0.9": (("svd", 0.9), _settings("svd", eps=0.9)),
    "asi": (("asi", None), _settings("asi")),
    "quant-8": (("quant", None), _settings("quant",
                                           method_kwargs={"bits": 8})),
    "quant-4": (None, _settings("quant", method_kwargs={"bits": 4})),
    "gradfilter": (("gradfilter", None), _settings("gradfilter")),
    "checkpoint": (("checkpoint", None), _settings("checkpoint")),
}
"""Row name -> (bench_speed's ``(method, eps)`` case or None, the settings
of every trained conv of the whole-step programs). The settings are
train.py's (``lowrank_vjp.training.method_settings``: HOSVD and SVD report
overflows instead of warning from inside the step), as are bench_speed's.
``quant`` is 8-bit by default, so bench_speed's ``quant`` is quant-8; it
takes no bits, so quant-4 has no layers row."""

DEFAULT_METHODS = ("vanilla,hosvd-0.8,hosvd-0.9,svd-0.9,asi,quant-8,"
                   "gradfilter,checkpoint")


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes, two methods, a temporary --out (CPU)")
  p.add_argument("--methods", default=None,
                 help=f"rows, of {list(ROWS)} (default: {DEFAULT_METHODS})")
  p.add_argument("--sections", default="step,layers,peak",
                 help="of step, layers, peak")
  p.add_argument("--budget-s", type=float, default=None,
                 help="wall-clock budget; later sections are skipped once "
                 "it is spent (default 285; smoke 150)")
  p.add_argument("--out", default=None,
                 help="where the JSON and Markdown go (default "
                 "docs/benchmarks/gpu; smoke: a temporary directory)")
  p.add_argument("--jobs", type=int, default=8,
                 help="fresh processes at a time in the peak section")
  p.add_argument("--step-jobs", type=int, default=4,
                 help="step section: processes compiling at a time")
  p.add_argument("--dtype", default="float32",
                 choices=("float32", "bfloat16", "float16"),
                 help="compute dtype of the step and peak sections (train.py's "
                 "--dtype; parameters stay float32)")
  p.add_argument("--step-batch", type=int, default=64)
  p.add_argument("--step-size", type=int, default=224)
  p.add_argument("--step-layers", default="4")
  p.add_argument("--warmup", type=int, default=2,
                 help="steps after the compile, before timing (ASI's first "
                 "is its cold, exact HOSVD)")
  p.add_argument("--rounds", type=int, default=5,
                 help="step section: interleaved rounds")
  p.add_argument("--round-steps", type=int, default=4,
                 help="step section: timed steps per method per round")
  p.add_argument("--layer-batch", type=int, default=64)
  p.add_argument("--layer-size", type=int, default=7)
  p.add_argument("--layer-repeats", type=int, default=20)
  p.add_argument("--peak-batch", type=int, default=16)
  p.add_argument("--peak-size", type=int, default=224)
  p.add_argument("--peak-layers", default="all")
  p.add_argument("--budget-mib", type=float, default=2048,
                 help="largest-batch budget (XLA's estimated peak)")
  p.add_argument("--tolerance", type=float, default=0.15,
                 help="lv.measure.max_batch's tolerance")
  p.add_argument("--max-batch-methods", default=None,
                 help="rows that get the largest-batch search (default: "
                 "all but hosvd-0.8, whose capacity and so program size is "
                 "hosvd-0.9's; '' for none)")
  p.add_argument("--peak-methods", default=None,
                 help="rows of the peak section (default: --methods but "
                 "hosvd-0.8, whose program is hosvd-0.9's size; its "
                 "compile, with every conv trained, is among the longest)")
  p.add_argument("--cache-dir", default=None,
                 help="a compilation cache kept after the run (default: a "
                 "temporary one per run). A second run on a filled cache "
                 "loads the programs it holds instead of compiling them, "
                 "so no compile-time autotuning scratch should enter its "
                 "allocator peaks, and its compile times are loads")
  p.add_argument("--render", default=None, metavar="JSON",
                 help="only rewrite JSON's Markdown page from it, and exit")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.smoke:
    args.methods = args.methods or "vanilla,hosvd-0.9"
    args.budget_s = 150.0 if args.budget_s is None else args.budget_s
    args.out = args.out or os.path.join(tempfile.gettempdir(),
                                        "lowrank_vjp_gpu_run")
    args.model = "cnn"
    args.step_batch, args.step_size, args.step_layers = 2, 16, "2"
    args.warmup, args.rounds, args.round_steps = 1, 2, 1
    args.layer_batch, args.layer_size, args.layer_repeats = 2, 3, 1
    args.peak_batch, args.peak_size, args.peak_layers = 2, 16, "1"
    args.budget_mib, args.tolerance = 8.0, 0.5
    args.jobs = args.step_jobs = 2
    if args.max_batch_methods is None:
      args.max_batch_methods = "vanilla"
  else:
    args.model = "mobilenet_v2"
  args.methods = args.methods or DEFAULT_METHODS
  args.budget_s = 285.0 if args.budget_s is None else args.budget_s
  args.out = args.out or OUT
  names = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    p.error(f"unknown --methods {unknown}; known: {list(ROWS)}")
  # Every ratio is to vanilla: it comes first.
  args.names = ["vanilla"] + [n for n in names if n != "vanilla"]
  if args.peak_methods is None:
    args.peak_names = [n for n in args.names if n != "hosvd-0.8"]
  else:
    args.peak_names = ["vanilla"] + [
        m.strip() for m in args.peak_methods.split(",")
        if m.strip() and m.strip() != "vanilla"]
    if set(args.peak_names) - set(args.names):
      p.error(f"--peak-methods {args.peak_names} must be among --methods "
              f"{args.names}")
  if args.max_batch_methods is None:
    args.max_batch_names = [n for n in args.peak_names if n != "hosvd-0.8"]
  else:
    args.max_batch_names = [m.strip() for m in
                            args.max_batch_methods.split(",") if m.strip()]
    if set(args.max_batch_names) - set(args.peak_names):
      p.error(f"--max-batch-methods {args.max_batch_names} must be among "
              f"the peak section's rows {args.peak_names}")
  args.section_names = [s.strip() for s in args.sections.split(",")
                        if s.strip()]
  bad = set(args.section_names) - {"step", "layers", "peak"}
  if bad:
    p.error(f"unknown --sections {sorted(bad)}")
  return args


# ------------------------------------------------------------- child ---

def concrete_step(setting: pm.Setting, name: str, batch: int):
  """``(jitted step, (state, frozen, images, labels))`` as arrays: the very
  program the peak tables compile (``make_step(..., concrete=True)``)."""
  return pm.make_step(setting, name, batch, concrete=True)


def allocator() -> tuple[dict | None, str | None]:
  """``(memory_stats() figures, None)``, or ``(None, why there are none)``."""
  device = jax.devices()[0]
  stats = device.memory_stats()
  if not stats:
    return None, (f"memory_stats() is {stats!r} on {device.platform}: no "
                  "allocator peak on this device")
  if "peak_bytes_in_use" not in stats:
    return None, (f"memory_stats() has no 'peak_bytes_in_use' on "
                  f"{device.platform} (keys: {sorted(stats)})")
  return {k: int(v) for k, v in stats.items()
          if isinstance(v, (int, np.integer))}, None


def _send(**msg):
  print(TAG + json.dumps(msg), flush=True)


def _xla(m: lv.measure.XlaMemory) -> dict:
  return {**dataclasses.asdict(m), "peak_bytes": m.peak_bytes}


def _predicted_batch(batch: int, peak: int, fixed: int, budget: int):
  """The largest batch an affine peak through ``(0, fixed)`` and
  ``(batch, peak)`` allows; ``fixed`` (parameters, optimizer state, frozen
  variables) is at most the true intercept, so this is at most the true
  largest batch wherever ``batch`` fits."""
  if peak > budget or peak <= fixed:
    return None
  return max(1, math.floor(batch * (budget - fixed) / (peak - fixed)))


def child(spec: dict) -> None:
  """One method in a fresh process; speaks in ``TAG`` lines on stdout."""
  name, batch = spec["method"], spec["batch"]
  # make_step takes a name of its METHODS: add this run's (hosvd-0.8, ...).
  if pm.METHODS.setdefault(name, spec["settings"]) != spec["settings"]:
    raise ValueError(f"{name}: peak_memory.METHODS has {pm.METHODS[name]}, "
                     f"this run {spec['settings']}")
  setting = pm.Setting(**spec["setting"])
  t = time.perf_counter()
  step, args = concrete_step(setting, name, batch)
  setup_s = time.perf_counter() - t
  _send(event="built")  # the model's initialisation is in the cache now
  t = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t
  xla = report_lib.compiled_memory(compiled)
  analysis = compiled.memory_analysis()
  before, _ = allocator()
  state, frozen, images, labels = args
  fixed = sum(x.nbytes for x in jax.tree.leaves((state, frozen)))
  del args

  def run(n):
    nonlocal state
    times, loss = [], None
    for _ in range(n):
      t = time.perf_counter()
      state, metrics = compiled(state, frozen, images, labels)
      loss = float(jax.block_until_ready(metrics["loss"]))
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t)
    return times, loss

  warm, loss = run(max(1, spec["warmup"]))
  _send(event="ready", setup_s=setup_s, compile_s=compile_s,
        xla=_xla(xla), xla_reported_peak_bytes=int(getattr(
            analysis, "peak_memory_in_bytes", 0) or 0),
        warmup_s=warm, loss=loss, fixed_bytes=int(fixed),
        peak_before_steps_bytes=(before or {}).get("peak_bytes_in_use"))
  if spec.get("interactive"):
    for line in sys.stdin:
      words = line.split()
      if words and words[0] == "time":
        times, loss = run(int(words[1]))
        _send(event="times", times_s=times, loss=loss)
      else:
        break
  stats, note = allocator()
  peak = None if stats is None else stats["peak_bytes_in_use"]
  # False: setup or compile (autotuning scratch) peaked above the steps.
  by_steps = None if peak is None else peak > before["peak_bytes_in_use"]
  _send(event="memory", allocator=stats, allocator_note=note,
        allocator_peak_bytes=peak, peak_set_by_steps=by_steps)
  search = spec.get("max_batch")
  if search:
    del state, frozen, images, labels, compiled
    budget = int(search["budget_bytes"])
    guess = _predicted_batch(batch, xla.peak_bytes, fixed, budget)
    start, limit = ((guess, max(guess + 1, math.ceil(1.5 * guess)))
                    if guess else (1, max(2, batch)))
    t = time.perf_counter()
    found = pm.max_batches(setting, [name], budget, start=start, limit=limit,
                           tolerance=search["tolerance"])[name]
    tried = dict(found.tried)
    if found.batch == 0 and start > 1:  # the guess did not fit after all
      found = pm.max_batches(setting, [name], budget, start=1, limit=start,
                             tolerance=search["tolerance"])[name]
      tried.update(found.tried)
    _send(event="max_batch", batch=found.batch, peak_bytes=found.peak_bytes,
          budget_bytes=budget, tolerance=search["tolerance"], start=start,
          limit=limit, at_limit=found.batch == limit,
          tried={str(b): p for b, p in sorted(tried.items())},
          compiles=len(tried), search_s=time.perf_counter() - t)
  _send(event="done")


# ------------------------------------------------------------ parent ---

def elapsed() -> float:
  return time.perf_counter() - T0


def log(msg: str) -> None:
  print(f"[{elapsed():6.1f} s] {msg}", flush=True)


class Child:
  """A fresh process running :func:`child`; its messages go to ``events``."""

  live: set[Child] = set()
  """Started and not yet stopped, to stop if the run itself fails."""

  cache_dir: str | None = None
  """The run's compilation cache (``--cache-dir``, or one in its logs)."""

  def __init__(self, spec: dict, events: queue.Queue, log_dir: str):
    self.spec, self.name, self.events = spec, spec["method"], events
    self.log_path = os.path.join(log_dir, f"{spec['section']}_"
                                 f"{self.name}.log")
    # One compilation cache per run, shared by its processes: the model's
    # initialisation (and largest-batch candidates' rebuilds) compile once;
    # no two measured steps of a run are the same program.
    cache_dir = Child.cache_dir or os.path.join(log_dir, "compilation_cache")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if spec.get("smoke"):  # cheaper random initialisation on a CPU
      env["JAX_DEFAULT_PRNG_IMPL"] = "rbg"
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    with open(self.log_path, "w") as stderr:
      self.proc = subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "--child",
           json.dumps(spec)], cwd=ROOT, env=env, text=True,
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    Child.live.add(self)
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      if line.startswith(TAG):
        self.events.put((self, json.loads(line[len(TAG):])))
    self.events.put((self, {"event": "exit", "rc": self.proc.wait()}))

  def send(self, line: str) -> None:
    self.proc.stdin.write(line + "\n")
    self.proc.stdin.flush()

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    Child.live.discard(self)

  def log_tail(self, n: int = 1500) -> str:
    with open(self.log_path) as f:
      return f.read()[-n:]


def _spec(args, section: str, name: str, setting: pm.Setting, batch: int,
          **extra) -> dict:
  return dict(section=section, method=name, settings=ROWS[name][1],
              setting=dict(model=setting.model, k=setting.k,
                           image_size=setting.image_size,
                           dtype=setting.dtype),
              batch=batch, warmup=args.warmup, smoke=args.smoke, **extra)


def _take(events: queue.Queue, deadline: float):
  """The next ``(child, message)``, or None once ``deadline`` passes."""
  try:
    return events.get(timeout=max(0.0, deadline - time.perf_counter()))
  except queue.Empty:
    return None


def _failed(row: dict, child: Child, msg: dict) -> None:
  row["error"] = (f"exited with {msg['rc']} before finishing; its log "
                  f"ends:\n{child.log_tail()}")


def _launch_all(specs, jobs, events, log_dir, deadline, rows, until):
  """Starts ``specs`` (``jobs`` at a time until each has sent ``until``);
  yields every further ``(child, message)``; kills the rest at
  ``deadline``. While the run's compilation cache is empty the first runs
  alone until it has built its model, so that the others find its
  initialisation compiled there."""
  cache = Child.cache_dir or os.path.join(log_dir, "compilation_cache")
  pending, busy = list(specs), set()
  gate = not (os.path.isdir(cache) and os.listdir(cache))
  while pending or busy:
    while (pending and len(busy) < (1 if gate else jobs)
           and time.perf_counter() < deadline):
      busy.add(Child(pending.pop(0), events, log_dir))
    got = _take(events, deadline) if busy else None
    if got is None:
      for c in busy:
        c.stop()
        measured = "allocator_peak_bytes" in rows[c.name]
        rows[c.name].setdefault("error", (
            "largest-batch search not finished" if measured
            else "not finished") + ": out of time (--budget-s)")
      for spec in pending:
        rows[spec["method"]]["error"] = "not started: out of time"
      return
    c, msg = got
    if msg["event"] in ("built", "exit", "error"):
      gate = False
    if msg["event"] in (until, "exit"):
      busy.discard(c)
    yield c, msg


def run_step_section(args, deadline, log_dir) -> dict:
  """Compile in fresh processes, time them in interleaved rounds, peaks."""
  setting = pm.Setting(args.model, args.step_layers, args.step_size,
                       dtype=args.dtype)
  events: queue.Queue = queue.Queue()
  rows = {n: {"method": n, "settings": ROWS[n][1]} for n in args.names}
  ready: list[Child] = []
  specs = [_spec(args, "step", n, setting, args.step_batch, interactive=True)
           for n in args.names]
  gen = _launch_all(specs, args.step_jobs, events, log_dir, deadline, rows,
                    until="ready")
  for c, msg in gen:
    if msg["event"] == "ready":
      rows[c.name].update({k: v for k, v in msg.items() if k != "event"})
      rows[c.name]["step_times_s"] = []
      ready.append(c)
      log(f"step: {c.name} compiled in {msg['compile_s']:.1f} s")
    elif msg["event"] == "error":
      rows[c.name]["error"] = msg["error"]
    elif msg["event"] == "exit" and "error" not in rows[c.name]:
      _failed(rows[c.name], c, msg)
  ready.sort(key=lambda c: args.names.index(c.name))

  def ask(c, line, want, timeout_s=120.0):
    c.send(line)
    while True:
      got = _take(events, time.perf_counter() + timeout_s)
      if got is None:
        return None
      other, msg = got
      if other is c and msg["event"] in (want, "exit", "error"):
        return msg if msg["event"] == want else None

  rounds = 0
  for _ in range(args.rounds):
    if time.perf_counter() > deadline:
      break
    for c in list(ready):
      msg = ask(c, f"time {args.round_steps}", "times")
      if msg is None:
        rows[c.name]["error"] = f"failed while timed: {c.log_tail()}"
        c.stop()
        ready.remove(c)
      else:
        rows[c.name]["step_times_s"] += msg["times_s"]
        rows[c.name]["loss"] = msg["loss"]
    rounds += 1
  for c in ready:
    msg = ask(c, "finish", "memory")
    if msg is not None:
      rows[c.name].update({k: v for k, v in msg.items() if k != "event"})
    c.stop()
  base = rows["vanilla"]
  for row in rows.values():
    if row.get("step_times_s"):
      row["step_s"] = float(np.median(row["step_times_s"]))
    if row.get("step_s") and base.get("step_s"):
      row["step_ratio"] = row["step_s"] / base["step_s"]
    if "step_s" in row:
      log(f"step: {row['method']} {1e3 * row['step_s']:.2f} ms "
          f"({_x(row.get('step_ratio'))} vanilla), XLA peak "
          f"{_mib(row['xla']['peak_bytes'])} MiB, allocator peak "
          f"{_mib(row.get('allocator_peak_bytes'))} MiB")
  return dict(setting=setting.label(), model=setting.model,
              layers=setting.k, image_size=setting.image_size,
              batch=args.step_batch, warmup=args.warmup, rounds=rounds,
              round_steps=args.round_steps, compile_jobs=args.step_jobs,
              rows=list(rows.values()))


def run_peak_section(args, deadline, log_dir) -> dict:
  """Allocator peaks in fresh processes, then the largest-batch searches."""
  setting = pm.Setting(args.model, args.peak_layers, args.peak_size,
                       dtype=args.dtype)
  budget = int(args.budget_mib * MiB)
  events: queue.Queue = queue.Queue()
  names = args.peak_names
  rows = {n: {"method": n, "settings": ROWS[n][1]} for n in names}
  specs = [_spec(args, "peak", n, setting, args.peak_batch,
                 max_batch=dict(budget_bytes=budget,
                                tolerance=args.tolerance)
                 if n in args.max_batch_names else None)
           for n in names]
  for c, msg in _launch_all(specs, args.jobs, events, log_dir, deadline,
                            rows, until="done"):
    row, event = rows[c.name], msg.pop("event")
    if event in ("ready", "memory"):
      row.update(msg)
      if event == "memory":
        peak = msg["allocator_peak_bytes"]
        log(f"peak: {c.name} XLA {row['xla']['peak_bytes'] / MiB:.1f} MiB, "
            "allocator " + ("unavailable" if peak is None
                            else f"{peak / MiB:.1f} MiB"))
    elif event == "max_batch":
      row["max_batch"] = msg
      log(f"max batch: {c.name} {msg['batch']} ({msg['compiles']} "
          f"compiles, {msg['search_s']:.0f} s)")
    elif event == "error":
      row["error"] = msg["error"]
    elif event == "exit" and msg["rc"] != 0 and "error" not in row:
      _failed(row, c, dict(msg, event=event))
  return dict(setting=setting.label(), model=setting.model,
              layers=setting.k, image_size=setting.image_size,
              batch=args.peak_batch, warmup=args.warmup, jobs=args.jobs,
              budget_bytes=budget, tolerance=args.tolerance,
              rows=list(rows.values()))


def load_bench_speed():
  """experiments/bench_speed.py, loaded by path (scripts are not a
  package)."""
  path = os.path.join(ROOT, "experiments", "bench_speed.py")
  spec = importlib.util.spec_from_file_location("gpu_run_bench_speed", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_layers_section(args) -> dict:
  """bench_speed's layers section, on this run's rows."""
  bench = load_bench_speed()
  cases = [ROWS[n][0] for n in args.names if ROWS[n][0] is not None]
  bench.CASES = cases  # its rows; its module, loaded for this run only
  result = bench.bench_layers(argparse.Namespace(
      batch=args.layer_batch, size=args.layer_size,
      repeats=args.layer_repeats))
  names = [n for n in args.names if ROWS[n][0] is not None]
  for name, row in zip(names, result["rows"], strict=True):
    row["name"] = name
  result["not_measured"] = [n for n in args.names if ROWS[n][0] is None]
  return result


# ---------------------------------------------------------- reports ---

def cuda_versions() -> dict | None:
  """What jax's CUDA plugin reports (None without one)."""
  from jax._src.lib import cuda_versions as versions  # the start-up check's
  if versions is None:
    return None
  found = {}
  for name in sorted(dir(versions)):
    if name.endswith("_version") and not name.startswith("_"):
      try:
        found[name] = int(getattr(versions, name)())
      except Exception as e:  # pylint: disable=broad-except
        found[name] = f"unavailable: {e}"
  try:
    with open("/sys/module/nvidia/version") as f:
      found["nvidia_driver"] = f.read().strip()
  except OSError:
    pass
  return found


def environment() -> dict:
  """Device, versions and settings of this run."""
  device = jax.devices()[0]
  packages = {}
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if re.match(r"(jax|jaxlib|flax|optax|nvidia-(cudnn|cuda|cublas)|"
                r"jax-cuda)", name):
      packages[name] = dist.version
  import jaxlib
  return {**report_lib.environment(),
          "platform": device.platform, "device_kind": device.device_kind,
          "device_count": jax.device_count(),
          "compute_capability": getattr(device, "compute_capability", None),
          "jaxlib": jaxlib.__version__, "cuda": cuda_versions(),
          "packages": dict(sorted(packages.items())),
          "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get(
              "XLA_PYTHON_CLIENT_PREALLOCATE"),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
          "LOWRANK_VJP_GPU_EIGH": os.environ.get("LOWRANK_VJP_GPU_EIGH"),
          "environment_info": jax.print_environment_info(return_string=True)}


def _mib(b) -> str:
  return "–" if b is None else f"{b / MiB:.1f}"


def _ms(s) -> str:
  return "–" if s is None else f"{1e3 * s:.2f}"


def _x(r) -> str:
  return "–" if r is None else f"{r:.2f}×"


def _ratio(a, b):
  return None if a is None or not b else a / b


def _peaks(row: dict) -> tuple[int | None, int | None]:
  """``(XLA's estimated peak, the allocator's peak)`` of a row."""
  return (row.get("xla", {}).get("peak_bytes"),
          row.get("allocator_peak_bytes"))


def _alloc(row: dict) -> str:
  """The allocator's peak in MiB, starred where the steps did not set it."""
  return _mib(row.get("allocator_peak_bytes")) + (
      "*" if row.get("peak_set_by_steps") is False else "")


def _row_errors(rows) -> list[str]:
  """A line per row with an error (its first line), after its table."""
  out = [f"- {r['method']}: {r['error'].splitlines()[0]}"
         for r in rows if r.get("error")]
  return out + [""] if out else []


def page(result: dict) -> str:
  """The Markdown page of a result; every figure comes from ``result``."""
  e = result["environment"]
  lines = [f"# lowrank_vjp on {e['device_kind']} ({e['date']})", "",
           f"`{result['command']}`, {result['wall_s']:.0f} s; jax "
           f"{e['jax']}, jaxlib {e['jaxlib']}, flax {e['flax']}, "
           f"CUDA {json.dumps(e['cuda'])}.", ""]
  lines += [f"- {n}" for n in result["notes"]] + [""]
  s = result["sections"].get("step")
  if s:
    lines += [f"## Whole step: {s['setting']}, batch {s['batch']}", "",
              "| method | compile s | step ms | step / vanilla | XLA peak MiB"
              " | allocator peak MiB | allocator / XLA |",
              "|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
      xla, peak = _peaks(r)
      lines.append(
          f"| {r['method']} | {r.get('compile_s', 0):.1f} | "
          f"{_ms(r.get('step_s'))} | {_x(r.get('step_ratio'))} | "
          f"{_mib(xla)} | {_alloc(r)} | {_x(_ratio(peak, xla))} |")
    lines += [""] + _row_errors(s["rows"])
  s = result["sections"].get("layers")
  if s:
    lines += [f"## Layers: the last four MobileNetV2 convolutions, "
              f"{s['setting']}", "",
              "Backward is step − forward (noise can make it negative at "
              "tiny sizes).", "",
              "| method | fwd ms | bwd ms | step ms | fwd × | bwd × | step × |",
              "|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
      lines.append(f"| {r['name']} | {_ms(r['forward_s'])} | "
                   f"{_ms(r['backward_s'])} | {_ms(r['step_s'])} | "
                   f"{r['forward_ratio']:.2f} | {r['backward_ratio']:.2f} | "
                   f"{r['step_ratio']:.2f} |")
    lines.append("")
  s = result["sections"].get("peak")
  if s:
    lines += [f"## Peak: {s['setting']}, batch {s['batch']}", "",
              "| method | XLA peak MiB | vanilla / method (XLA) | allocator "
              "peak MiB | allocator / XLA | vanilla / method (allocator) | "
              f"largest batch under {s['budget_bytes'] / MiB:.0f} MiB | its "
              "XLA peak MiB |",
              "|---|---|---|---|---|---|---|---|"]
    base = s["rows"][0]
    for r in s["rows"]:
      xla, peak = _peaks(r)
      # A starred peak bounds its process's steps from above only: no ratio.
      by_steps = (r.get("peak_set_by_steps") is True
                  and base.get("peak_set_by_steps") is True)
      saving = _ratio(_peaks(base)[1], peak) if by_steps else None
      mb = r.get("max_batch") or {}
      batch = mb.get("batch")
      batch = "–" if batch is None else f"{batch}" + (
          "+" if mb.get("at_limit") else "")
      lines.append(f"| {r['method']} | {_mib(xla)} | "
                   f"{_x(_ratio(_peaks(base)[0], xla))} | {_alloc(r)} | "
                   f"{_x(_ratio(peak, xla))} | {_x(saving)} | "
                   f"{batch} | {_mib(mb.get('peak_bytes'))} |")
    lines += [""] + _row_errors(s["rows"])
  if any(r.get("peak_set_by_steps") is False
         for s in result["sections"].values() for r in s.get("rows", [])):
    lines += ["\\* The process peaked before its first step (setup or "
              "compile, autotuning scratch included): the steps' own peak "
              "is at most this, and no saving is computed from it. A second "
              "run on the first one's `--cache-dir` loads the programs "
              "instead of compiling them.", ""]
  for skipped in result["skipped"]:
    lines.append(f"Skipped {skipped['section']}: {skipped['reason']}.")
  for failed in result.get("failed", []):
    lines.append(f"Failed {failed['section']} (see the JSON's `failed`).")
  if result.get("partial"):
    lines.append("**Partial**: a section was skipped or failed, or a row "
                 "has an error (the JSON says which).")
  return "\n".join(lines) + "\n"


def output_path(out: str, device_kind: str, date: str, smoke: bool) -> str:
  """``<out>/<device kind>_<date>[_smoke].json``, not overwriting."""
  slug = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")
  stem = f"{slug}_{date}" + ("_smoke" if smoke else "")
  path, n = os.path.join(out, stem + ".json"), 2
  while os.path.exists(path):
    path, n = os.path.join(out, f"{stem}-{n}.json"), n + 1
  return path


NOTES = [
    "Random weights everywhere: shapes are what count for time and memory.",
    "Allocator peak: memory_stats()['peak_bytes_in_use'] of a fresh process "
    "(XLA_PYTHON_CLIENT_PREALLOCATE=false) over its whole life: setup, "
    "compile (autotuning scratch included; peak_before_steps_bytes is the "
    "figure before the first step) and the steps. XLA peak: argument + "
    "output + temp − alias of the same compiled, donated step.",
    "Step times: medians of the timed steps, interleaved round by round "
    "with the other methods' processes (one steps at a time), compile and "
    "warm-up apart; compile_s was measured with up to --step-jobs "
    "processes compiling at once.",
    "At a fixed capacity ε only masks components: the hosvd-0.8 and "
    "hosvd-0.9 programs differ only by noise in time and not in memory.",
    "Largest batch: lv.measure.max_batch on XLA's estimate (compile-only), "
    "started at the batch an affine fit through the measured peak "
    "predicts; '+' marks a batch at the search's limit (a larger one may "
    "fit).",
]


def main(argv=None) -> dict:
  args = parse(argv)
  if args.child is not None:
    try:
      child(json.loads(args.child))
    except Exception:  # pylint: disable=broad-except
      _send(event="error", error=traceback.format_exc())
      raise
    return {}
  if args.render:
    with open(args.render) as f:
      rendered = page(json.load(f))
    with open(args.render[:-len(".json")] + ".md", "w") as f:
      f.write(rendered)
    return {}
  global T0
  t_start = T0 = time.perf_counter()
  deadline = t_start + args.budget_s
  env = environment()
  log(f"{env['device_kind']} ({env['platform']}), jax {env['jax']}, jaxlib "
      f"{env['jaxlib']}, CUDA {env['cuda']}; budget {args.budget_s:.0f} s")
  command = "experiments/gpu_run.sh " + shlex.join(
      argv if argv is not None else sys.argv[1:])
  result = {"command": command.strip(), "smoke": args.smoke,
            "environment": env, "budget_s": args.budget_s,
            "methods": args.names, "notes": list(NOTES), "sections": {},
            "section_s": {}, "skipped": [], "failed": []}
  if args.smoke:
    result["notes"].append("Smoke run: tiny sizes; its fresh processes use "
                           "JAX_DEFAULT_PRNG_IMPL=rbg (a cheaper "
                           "initialisation to compile). The figures check "
                           "the machinery only.")
  if env["platform"] == "cpu":
    result["notes"].append("On the CPU: memory_stats() gives no allocator "
                           "peak, and jax.checkpoint saves nothing "
                           "(XLA:CPU drops its barrier).")
  os.makedirs(args.out, exist_ok=True)
  path = output_path(args.out, env["device_kind"], env["date"], args.smoke)
  log_dir = tempfile.mkdtemp(prefix="gpu_run_logs_")
  if args.cache_dir:
    Child.cache_dir = os.path.abspath(args.cache_dir)
    filled = os.path.isdir(Child.cache_dir) and bool(os.listdir(
        Child.cache_dir))
    result["cache_filled_at_start"] = filled
    if filled:
      result["notes"].append(
          "This run started on a filled compilation cache (--cache-dir): its "
          "processes load the programs an earlier run compiled into it, so "
          "compile_s is a load, and the allocator peaks should hold no "
          "compile-time autotuning scratch (peak_set_by_steps tells whether "
          "each process's steps set its peak).")
  runners = {"step": lambda: run_step_section(args, deadline, log_dir),
             "layers": lambda: run_layers_section(args),
             "peak": lambda: run_peak_section(args, deadline, log_dir)}

  def save(partial):
    result["wall_s"] = time.perf_counter() - t_start
    result["partial"] = partial
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
    with open(path[:-len(".json")] + ".md", "w") as f:
      f.write(page(result))

  try:
    run_sections(args, result, runners, deadline, save)
  finally:
    for c in list(Child.live):
      c.stop()
    # Its executables are this run's only; the logs stay.
    if not args.cache_dir:
      shutil.rmtree(os.path.join(log_dir, "compilation_cache"),
                    ignore_errors=True)
  save(partial=bool(result["skipped"] or result["failed"] or any(
      "error" in r for s in result["sections"].values()
      for r in s.get("rows", []))))
  print(page(result))
  log(f"wrote {path} and its .md; child logs in {log_dir}")
  return result


def run_sections(args, result, runners, deadline, save) -> None:
  """Runs the chosen sections in order; skips those out of budget."""
  # Seconds a section needs at least to end with figures on an H100: the
  # layers section cannot be stopped halfway, the others stop at the
  # deadline (whatever has finished is kept).
  least = {"step": 60.0, "layers": 45.0, "peak": 60.0}
  if args.smoke:
    least = dict.fromkeys(least, 1.0)
  for name in args.section_names:
    left = deadline - time.perf_counter()
    if left < least[name]:
      reason = (f"{left:.0f} s of --budget-s {args.budget_s:.0f} left, "
                f"fewer than the {least[name]:.0f} s it needs at least")
      result["skipped"].append({"section": name, "reason": reason})
      log(f"{name}: skipped ({reason})")
      continue
    t = time.perf_counter()
    log(f"{name}: started")
    try:
      result["sections"][name] = runners[name]()
    except Exception:  # pylint: disable=broad-except  # the others still run
      result["failed"].append({"section": name,
                               "error": traceback.format_exc()})
      log(f"{name}: failed:\n{result['failed'][-1]['error']}")
    result["section_s"][name] = time.perf_counter() - t
    log(f"{name}: done in {result['section_s'][name]:.1f} s")
    save(partial=True)


if __name__ == "__main__":
  main()
