"""lowrank_vjp.training: the experiments' reusable training code.

The fine-tuning loop of ``experiments/train.py`` and what the other
experiments share: the jitted train step (state donated), the rank
controller's redo, evaluation, Orbax checkpoints (exact resume), metrics as
JSON lines, reports and figures, the offline datasets through
tensorflow-datasets, cached frozen prefixes, the method-name settings.

Needs the ``training`` extra (``pip install "lowrank_vjp[training]"``).
Orbax, tensorflow-datasets, matplotlib and tqdm are imported on first use,
not by ``import lowrank_vjp.training`` (and never by ``import
lowrank_vjp``).
"""

from lowrank_vjp.training import benchmarks_page as benchmarks_page
from lowrank_vjp.training import cached_features as cached_features
from lowrank_vjp.training import data as data
from lowrank_vjp.training import digits_net as digits_net
from lowrank_vjp.training import factorized as factorized
from lowrank_vjp.training import plots as plots
from lowrank_vjp.training import segmentation as segmentation
from lowrank_vjp.training import text as text
from lowrank_vjp.training.checkpoint import Checkpointer as Checkpointer
from lowrank_vjp.training.config import TrainConfig as TrainConfig
from lowrank_vjp.training.data import Split as Split
from lowrank_vjp.training.data import default_dataset as default_dataset
from lowrank_vjp.training.data import load as load
from lowrank_vjp.training.evaluation import evaluate as evaluate
from lowrank_vjp.training.evaluation import evaluate_arrays as evaluate_arrays
from lowrank_vjp.training.evaluation import evaluate_metrics as evaluate_metrics
from lowrank_vjp.training.evaluation import make_eval_step as make_eval_step
from lowrank_vjp.training.job import train_one as train_one
from lowrank_vjp.training.loop import Run as Run
from lowrank_vjp.training.loop import fit as fit
from lowrank_vjp.training.loop import make_controller as make_controller
from lowrank_vjp.training.loop import run_step as run_step
from lowrank_vjp.training.loop import timed_step as timed_step
from lowrank_vjp.training.methods import VANILLA as VANILLA
from lowrank_vjp.training.methods import carries_state as carries_state
from lowrank_vjp.training.methods import is_checkpoint as is_checkpoint
from lowrank_vjp.training.methods import is_vanilla as is_vanilla
from lowrank_vjp.training.methods import method_name as method_name
from lowrank_vjp.training.methods import method_settings as method_settings
from lowrank_vjp.training.methods import run_label as run_label
from lowrank_vjp.training.methods import run_names as run_names
from lowrank_vjp.training.methods import settings_for as settings_for
from lowrank_vjp.training.methods import unsupported as unsupported
from lowrank_vjp.training.methods import uses_ranks as uses_ranks
from lowrank_vjp.training.metrics import MetricsWriter as MetricsWriter
from lowrank_vjp.training.metrics import MiB as MiB
from lowrank_vjp.training.metrics import check_finite as check_finite
from lowrank_vjp.training.metrics import read_metrics as read_metrics
from lowrank_vjp.training.metrics import stats_row as stats_row
from lowrank_vjp.training.metrics import write_metrics as write_metrics
from lowrank_vjp.training.model import build_model as build_model
from lowrank_vjp.training.model import input_spec as input_spec
from lowrank_vjp.training.model import make_rules as make_rules
from lowrank_vjp.training.optim import make_optimizer as make_optimizer
from lowrank_vjp.training.plots import plot_runs as plot_runs
from lowrank_vjp.training.programs import Programs as Programs
from lowrank_vjp.training.report import compiled_memory as compiled_memory
from lowrank_vjp.training.report import environment as environment
from lowrank_vjp.training.report import make_report as make_report
from lowrank_vjp.training.report import (
    rank_control_report as rank_control_report,
)
from lowrank_vjp.training.report import summarise as summarise
from lowrank_vjp.training.report import table as table
from lowrank_vjp.training.nnx_step import NNX_MODELS as NNX_MODELS
from lowrank_vjp.training.nnx_step import NnxTraining as NnxTraining
from lowrank_vjp.training.nnx_step import build_nnx_model as build_nnx_model
from lowrank_vjp.training.nnx_step import nnx_training as nnx_training
from lowrank_vjp.training.step import final_variables as final_variables
from lowrank_vjp.training.step import init_asi_state as init_asi_state
from lowrank_vjp.training.step import initial_state as initial_state
from lowrank_vjp.training.step import make_train_step as make_train_step
from lowrank_vjp.training.step import uses_asi as uses_asi

__all__ = (
    "NNX_MODELS",
    "NnxTraining",
    "build_nnx_model",
    "nnx_training",
    "Checkpointer",
    "MetricsWriter",
    "MiB",
    "Programs",
    "Run",
    "Split",
    "TrainConfig",
    "VANILLA",
    "benchmarks_page",
    "build_model",
    "cached_features",
    "carries_state",
    "check_finite",
    "compiled_memory",
    "data",
    "default_dataset",
    "digits_net",
    "environment",
    "evaluate",
    "evaluate_arrays",
    "evaluate_metrics",
    "factorized",
    "final_variables",
    "fit",
    "init_asi_state",
    "initial_state",
    "input_spec",
    "is_checkpoint",
    "is_vanilla",
    "load",
    "make_controller",
    "make_eval_step",
    "make_optimizer",
    "make_report",
    "make_rules",
    "make_train_step",
    "method_name",
    "method_settings",
    "plot_runs",
    "plots",
    "rank_control_report",
    "read_metrics",
    "run_label",
    "run_names",
    "run_step",
    "segmentation",
    "settings_for",
    "stats_row",
    "summarise",
    "table",
    "text",
    "timed_step",
    "train_one",
    "unsupported",
    "uses_asi",
    "uses_ranks",
    "write_metrics",
)
