"""Training the adapter (notebook 02, the VLM stages of 05, `python -m helpers train`).

Read it in this order:
- config.py       TrainConfig and the presets: the knobs a student turns
- data.py         records -> tokens with the loss mask -> packed rows; the collator's flat row
- plan.py         make_plan: how this run trains on this machine, decided once, with the reason for each choice
- model.py        the base in the plan's weights + a fresh LoRA adapter, as a PackedCausalLM
- packed.py       PackedCausalLM: its forward is the packed loss (varlen attention, chunked cross-entropy)
- trainer.py      transformers' Trainer through its public hooks: the loss, the NaN guard, complete checkpoints
- callbacks.py    evaluation rounds, metrics.jsonl and the loss curve, the progress bar
- checkpoints.py  complete checkpoints, the run's fingerprint, resuming
- run.py          train(config, work): the verb that ties them together
- results.py      reading a run back: metrics, evaluation rounds, the adapter
- cli.py          the command line and the ranks of a multi-GPU launch

Notebooks say `from helpers.train import TrainConfig, train`; the names below are this package's public surface.
The light ones import at once; the rest (they import torch and transformers) on first use.
"""
from __future__ import annotations

import importlib

from .checkpoints import (CHECKPOINT_MARK, LOSS_SUM_FILE, RUN_FILE, checkpoint_is_complete, complete_checkpoints,
                          fingerprint_difference)
from .config import PRESETS, QUANTIZATIONS, TrainConfig, TrainConfigError, TrainingDiverged
from .data import Collator, build_dataset, encode_dataset, pack_samples, packed_row_table
from .results import (append_line, evaluation_rounds, evaluation_table, identity_learned, load_adapter_model,
                      loss_plot_png, peak_memory_mb, read_jsonl, read_metrics)

_LAZY = {
    "train": "run", "save_adapter": "run", "gpu_share": "run", "share_gpu": "run", "GPU_SHARE_ENV": "run",
    "plan_for": "run", "updates_of": "run",
    "TrainingPlan": "plan", "Hardware": "plan", "make_plan": "plan",
    "load_model_for_training": "model", "target_module_names": "model",
    "PackedCausalLM": "packed", "generation_mode": "packed",
    "CourseTrainer": "trainer", "course_trainer": "trainer", "training_arguments": "trainer",
    "EvaluationCallback": "callbacks", "MetricsCallback": "callbacks", "ProgressCallback": "callbacks",
    "add_command": "cli",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CHECKPOINT_MARK", "LOSS_SUM_FILE", "RUN_FILE", "checkpoint_is_complete", "complete_checkpoints",
           "fingerprint_difference", "PRESETS", "QUANTIZATIONS", "TrainConfig", "TrainConfigError",
           "TrainingDiverged", "Collator", "build_dataset", "encode_dataset", "pack_samples", "packed_row_table",
           "append_line", "evaluation_rounds", "evaluation_table", "identity_learned", "load_adapter_model",
           "loss_plot_png", "peak_memory_mb", "read_jsonl", "read_metrics", *_LAZY]
