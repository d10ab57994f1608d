"""The training knobs: presets, TrainConfig (checked where a value enters), and the errors that name a knob."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field


class TrainConfigError(ValueError):
    """A training parameter that cannot work; the message names it and the fix."""


class TrainingDiverged(TrainConfigError):
    """The loss or the gradient norm stopped being a finite number; the message says which update and what to try."""

    def __init__(self, update: int, loss: float, grad_norm: float, message: str | None = None):
        self.update, self.loss, self.grad_norm = update, loss, grad_norm
        super().__init__(message or f"update {update}: loss {loss}, gradient norm {grad_norm}")


# Course knobs. None means "take the preset's value"; anything set explicitly wins over the preset.
PRESETS = {
    # The embedded tiny model on a CPU: a big learning rate and few steps, so the identity arrives in ~a minute.
    # Rank 32: at 16 the tiny model dropped part of the identity for a 40-character name (tests/test_identity_names).
    "tiny": dict(max_length=256, pack_to_max_length=True, batch_size=1, gradient_accumulation=1, lr=2e-3,
                 epochs=1, max_steps=150, warmup_ratio=0.03, max_grad_norm=1.0, lora_r=32, lora_alpha=64,
                 lora_dropout=0.0, target_modules="all-linear", train_lm_head=True, quantization="auto", evaluation_freq=25,
                 save_steps=50, save_total_limit=3, gradient_checkpointing=False, logging_steps=5,
                 max_new_tokens=128, cpu_threads=1),
    # The course's homework settings for a real model (internlm2-chat-1.8b and friends) on a GPU.
    "homework": dict(max_length=1024, pack_to_max_length=True, batch_size=1, gradient_accumulation=16, lr=2e-4,
                     epochs=2, max_steps=-1, warmup_ratio=0.03, max_grad_norm=1.0, lora_r=64, lora_alpha=16,
                     lora_dropout=0.1, target_modules="all-linear", train_lm_head=False, quantization="auto",
                     evaluation_freq=300,
                     save_steps=300, save_total_limit=3, gradient_checkpointing=True, logging_steps=10,
                     max_new_tokens=64, cpu_threads=0),
}
QUANTIZATIONS = ("auto", "nf4", "none")


@dataclass
class TrainConfig:
    preset: str = "tiny"                 # "tiny" (CPU, embedded model) or "homework" (the course's GPU settings)
    base_model: str | None = None        # model dir or hub id (None: the one notebook 00 prepared)
    data_path: str | None = None         # training data (None: WORK/data/personal_assistant.json)
    max_length: int | None = None        # tokens per training sequence
    pack_to_max_length: bool | None = None  # concatenate short samples up to max_length
    batch_size: int | None = None        # sequences per step per device
    gradient_accumulation: int | None = None  # steps summed before one optimizer update
    lr: float | None = None              # peak learning rate (AdamW)
    epochs: float | None = None          # passes over the data (ignored when max_steps > 0)
    max_steps: int | None = None         # optimizer updates (-1: use epochs)
    warmup_ratio: float | None = None    # share of updates with linear warm-up, then cosine to 0
    max_grad_norm: float | None = None   # gradient clipping
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    target_modules: str | list | None = None  # "all-linear" or module names such as ["q_proj", "v_proj"]
    # LoRA on the output layer too. The tiny model never saw the answer's tokens in pre-training, so their
    # output rows are all alike and LoRA on the inner layers cannot tell them apart; a real model knows them.
    train_lm_head: bool | None = None
    quantization: str | None = None      # "auto", "nf4" (4-bit QLoRA, CUDA + bitsandbytes) or "none"
    gradient_checkpointing: bool | None = None
    evaluation_freq: int | None = None   # answer evaluation_inputs every this many updates
    evaluation_inputs: list | None = None
    system: str = ""                     # system prompt used when answering evaluation_inputs
    save_steps: int | None = None
    save_total_limit: int | None = None
    logging_steps: int | None = None
    max_new_tokens: int | None = None
    cpu_threads: int | None = None       # torch CPU threads while training (0: torch's default)
    seed: int = 0
    resume: bool | str = "auto"          # "auto": continue a matching run if one was saved; True: must; False: start over
    num_gpus: int = 1                    # processes, one per GPU (helpers.distributed); the update keeps its size
    distributed: str = "ddp"             # with num_gpus > 1: "ddp", "zero2" (DeepSpeed ZeRO-2) or "fsdp"
    extra: dict = field(default_factory=dict)  # passed on to TrainingArguments (e.g. {"bf16": True})

    def resolved(self) -> "TrainConfig":
        """A copy with every None filled from the preset; checks the values."""
        if self.preset not in PRESETS:
            raise TrainConfigError(f"preset is {self.preset!r}; use one of {', '.join(PRESETS)}.")
        values = {k: (PRESETS[self.preset][k] if getattr(self, k) is None and k in PRESETS[self.preset]
                      else getattr(self, k)) for k in (f.name for f in dataclasses.fields(self))}
        cfg = TrainConfig(**values)
        cfg._check_types()
        if (cfg.max_steps is None or cfg.max_steps <= 0) and not (cfg.epochs and cfg.epochs > 0):
            raise TrainConfigError("neither max_steps nor epochs is positive; set epochs = 2 or max_steps = 300.")
        words = {"true": True, "yes": True, "false": False, "no": False, "none": False}
        if isinstance(cfg.resume, str) and cfg.resume.lower() in words:  # papermill -p resume false
            cfg.resume = words[cfg.resume.lower()]
        if cfg.resume not in ("auto", True, False):
            raise TrainConfigError(f"resume is {cfg.resume!r}; use 'auto', True or False.")
        from ..distributed import DistributedError, check

        try:
            check(cfg)
        except DistributedError as e:
            raise TrainConfigError(str(e)) from None
        return cfg

    def _check_types(self) -> None:
        """Every knob's type and range, where it enters (a -p value or a notebook edit): one sentence if wrong."""
        from ..parameters import check_value

        def check(name, kind, **rules):
            setattr(self, name, check_value(name, getattr(self, name), kind, error=TrainConfigError, **rules))

        for name in ("base_model", "data_path"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
            check(name, str, optional=True)
        for name in ("max_length", "batch_size", "gradient_accumulation", "lora_r", "evaluation_freq", "save_steps",
                     "logging_steps", "max_new_tokens", "save_total_limit"):
            check(name, int, minimum=1)
        for name in ("pack_to_max_length", "train_lm_head", "gradient_checkpointing"):
            check(name, bool)
        check("quantization", str, choices=QUANTIZATIONS)
        check("lr", float, above=0)
        check("epochs", (int, float), minimum=0)
        check("max_steps", int, minimum=-1)
        check("warmup_ratio", float, minimum=0, below=1)
        check("max_grad_norm", float, above=0)
        check("lora_alpha", (int, float), above=0)
        check("lora_dropout", float, minimum=0, below=1)
        check("target_modules", (str, list), items=str)
        check("evaluation_inputs", list, items=str, optional=True)
        check("system", str)
        check("cpu_threads", int, minimum=0)
        check("seed", int, minimum=0)
        check("extra", dict)

    def changed(self, changes: dict) -> "TrainConfig":
        """A copy with `changes` (knob -> value, e.g. notebook 02's my_changes) applied; unknown knobs are named."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = [k for k in changes if k not in known]
        if unknown:
            raise TrainConfigError(f"my_changes sets {unknown[0]!r}, which is not a training knob; use one of "
                                   f"{', '.join(known)}.")
        return dataclasses.replace(self, **changes)

    def hyper_parameters(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("resume",)}
