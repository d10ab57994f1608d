"""The QLoRA fine-tune: a TrainConfig, one verb `train(config, work)`, and the pieces it is made of.

The pieces are separate so a faster path can replace one of them: `load_model_for_training`
(quantization "auto"/"nf4"/"none" + LoRA), `build_dataset` + `make_collator` (tokens, loss mask,
packing), `compute_loss`, and the callbacks (evaluation rounds, metrics, loss curve, progress).
Training itself is transformers' Trainer; checkpoints are written atomically (temp dir + rename).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .data import IGNORE_INDEX, DataError, atomic_write_text, encode_messages, file_sha256, load_dataset
from .paths import Work, staged_dir
from .progress import headless
from .progress import tqdm as progress_bar
from .template import align_special_ids


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
CHECKPOINT_MARK = "checkpoint_complete.json"  # written last, listing every file and its size
LOSS_SUM_FILE = "loss_sum.json"  # in each checkpoint: the sum of every update's loss so far (for mean_loss)
RUN_FILE = "run.json"  # the fingerprint of the run the checkpoints belong to


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
        from .distributed import DistributedError, check

        try:
            check(cfg)
        except DistributedError as e:
            raise TrainConfigError(str(e)) from None
        return cfg

    def _check_types(self) -> None:
        """Every knob's type and range, where it enters (a -p value or a notebook edit): one sentence if wrong."""
        from .parameters import check_value

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


# ---------------------------------------------------------------- the model
def resolve_quantization(quantization: str) -> tuple[str, str]:
    """'auto' -> 'nf4' where CUDA and bitsandbytes are there, else 'none'; returns (choice, note)."""
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    if quantization == "nf4":
        if not cuda:
            raise TrainConfigError("quantization='nf4' needs a CUDA GPU and none is visible; use "
                                   "quantization='none' (16/32-bit LoRA) or 'auto' on this machine.")
        if not bnb:
            raise TrainConfigError("quantization='nf4' needs the bitsandbytes package, which is not installed; "
                                   "pip install bitsandbytes, or use quantization='none'.")
        return "nf4", "4-bit NF4 with double quantisation (QLoRA)"
    if quantization == "auto" and cuda:
        from .fast_path import make_plan

        if make_plan().precision in ("bf16", "fp16"):  # a big GPU: 16-bit LoRA is faster and still fits
            return "none", "a GPU with plenty of memory: LoRA on the 16-bit model (the fast path picks this)"
    if quantization == "auto" and cuda and bnb:
        return "nf4", "4-bit NF4 with double quantisation (QLoRA)"
    if quantization == "auto":
        why = "no CUDA GPU" if not cuda else "bitsandbytes is not installed"
        return "none", f"{why}: training a plain LoRA adapter on the 16/32-bit model (same recipe, more memory)"
    return "none", "plain LoRA on the 16/32-bit model"


def target_module_names(model, target_modules, train_lm_head: bool = False) -> list[str]:
    """The LoRA targets as module names: 'all-linear' = every linear layer but the output one; checked."""
    import torch

    linear = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear) or type(mod).__name__.startswith("Linear")}
    inner = sorted(linear - {"lm_head"})
    if target_modules == "all-linear":
        wanted = inner
    else:
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        unknown = [m for m in wanted if m not in linear]
        if unknown:
            raise TrainConfigError(f"target_modules names {unknown}, which this model does not have; use "
                                   f"'all-linear' or some of {inner}.")
    return wanted + (["lm_head"] if train_lm_head and "lm_head" in linear and "lm_head" not in wanted else [])


def load_model_for_training(config: TrainConfig, model_path: str):
    """The base model (4-bit NF4 or 16/32-bit) with a fresh LoRA adapter; returns (model, tokenizer, quantization)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from .base_model import check_model_dir

    if Path(model_path).exists():
        check_model_dir(model_path)
    from transformers import AutoConfig

    from . import fast_path
    from .distributed import adjust_plan

    # On a CUDA GPU: fp32 adapters, compiled layers, packs sized to the card (helpers.fast_path); None elsewhere.
    plan = adjust_plan(fast_path.trainer_plan(config, config.quantization,
                                              AutoConfig.from_pretrained(model_path) if torch.cuda.is_available()
                                              else None), config)
    if plan is not None and config.quantization == "auto":
        quantization = "nf4" if plan.precision == "nf4" else "none"
        note = ("4-bit NF4 with double quantisation (QLoRA): 16-bit weights do not fit this GPU" if quantization == "nf4"
                else "a GPU with room for them: LoRA on the 16-bit model")
    else:
        quantization, note = resolve_quantization(config.quantization)
    checkpointing = plan.gradient_checkpointing if plan is not None else config.gradient_checkpointing
    kwargs = {}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif torch.cuda.is_available():
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        kwargs["dtype"] = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False  # a cache would also hide packed sequences from the mask builder
    if quantization == "nf4" and plan is None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = target_module_names(model, config.target_modules, config.train_lm_head)
    set_seed(config.seed)  # the adapter's initial weights
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if plan is not None:
        from .fast_path import prepare_trainer_model

        model = prepare_trainer_model(model, plan, config.max_length)
        note += f"; fast path: {plan.reason}"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, quantization, note


# ---------------------------------------------------------------- data: tokens, loss mask, packing
def encode_dataset(tokenizer, data_path, max_length: int) -> list[dict]:
    """Every record as {input_ids, labels}, truncated to max_length; one sentence for data that cannot train."""
    conversations = load_dataset(data_path)
    encoded: dict[str, dict] = {}  # the course's data repeats a few conversations thousands of times: encode each once
    full = []
    for c in conversations:
        key = json.dumps(c, ensure_ascii=False, sort_keys=True)
        if key not in encoded:
            encoded[key] = encode_messages(tokenizer, c)
        full.append(encoded[key])
    lengths = [len(e["input_ids"]) for e in full]
    if min(lengths) > max_length:
        raise TrainConfigError(f"max_length={max_length} is shorter than every sample in {data_path} (the shortest "
                               f"is {min(lengths)} tokens); raise max_length to at least {min(lengths)}.")
    samples = []
    for i, e in enumerate(full):
        ids, labels = e["input_ids"][:max_length], e["labels"][:max_length]
        if all(lab == IGNORE_INDEX for lab in labels):
            raise TrainConfigError(
                f"{data_path}: record {i} has no assistant tokens left after truncation to max_length={max_length} "
                f"(it is {lengths[i]} tokens, the answer starts later); raise max_length or shorten that record.")
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def pack_samples(samples: list[dict], max_length: int, seed: int = 0) -> list[dict]:
    """Concatenate samples (in a seeded shuffled order) into rows of at most max_length tokens.

    position_ids restart at 0 for every sample: the attention mask is built from them, so no token sees
    another sample, and the first token of a sample is never a target of the one before.
    """
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    rows, row = [], {"input_ids": [], "labels": [], "position_ids": []}
    for i in order:
        s = samples[i]
        if row["input_ids"] and len(row["input_ids"]) + len(s["input_ids"]) > max_length:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] += s["input_ids"]
        row["labels"] += [IGNORE_INDEX] + s["labels"][1:]
        row["position_ids"] += list(range(len(s["input_ids"])))
    if row["input_ids"]:
        rows.append(row)
    return rows


def build_dataset(tokenizer, config: TrainConfig, data_path) -> tuple[list[dict], dict]:
    """The training rows and a summary (samples, rows, tokens, trained tokens)."""
    samples = encode_dataset(tokenizer, data_path, config.max_length)
    rows = pack_samples(samples, config.max_length, config.seed) if config.pack_to_max_length else samples
    tokens = sum(len(r["input_ids"]) for r in rows)
    trained = sum(sum(lab != IGNORE_INDEX for lab in r["labels"]) for r in rows)
    return rows, {"samples": len(samples), "rows": len(rows), "tokens": tokens, "trained_tokens": trained,
                  "packed": bool(config.pack_to_max_length)}


def packed_row_table(tokenizer, row: dict):
    """One training row, sample by sample: its positions, the text read, and the text trained on (the loss mask)."""
    import pandas as pd

    ids, labels = row["input_ids"], row["labels"]
    positions = row.get("position_ids") or list(range(len(ids)))
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
    out = []
    for a, b in zip(starts, starts[1:]):
        trained = [t for t, lab in zip(ids[a:b], labels[a:b]) if lab != IGNORE_INDEX]
        out.append({"positions": f"0..{b - a - 1}", "text": tokenizer.decode(ids[a:b]),
                    "trained on": tokenizer.decode(trained)})
    return pd.DataFrame(out)


class Collator:
    """Pads a batch to its longest row. Packed rows carry position_ids and no attention_mask (the mask
    builder turns restarting positions into a block-diagonal causal mask); plain rows get an attention_mask."""

    def __init__(self, pad_token_id: int, varlen: tuple[int, int] | None = None):
        self.pad = pad_token_id
        self.varlen = varlen  # the fast path's (tokens per forward, max_length): packed rows also go flat, as it reads them

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "labels": []}
        packed = "position_ids" in rows[0]
        for r in rows:
            n = width - len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [self.pad] * n)
            batch["labels"].append(r["labels"] + [IGNORE_INDEX] * n)
            if packed:  # the padding is a block of its own
                batch.setdefault("position_ids", []).append(r["position_ids"] + list(range(n)))
            else:
                batch.setdefault("attention_mask", []).append([1] * len(r["input_ids"]) + [0] * n)
        batch = {k: torch.tensor(v) for k, v in batch.items()}
        if packed and self.varlen:
            from .fast_path import batch_from_positions

            batch["varlen"] = batch_from_positions(batch, *self.varlen)
        return batch


def make_collator(tokenizer, model=None) -> Collator:
    """The Trainer's collator; for a model prepared for the fast path it also lays each batch out flat."""
    fast = getattr(model.get_base_model(), "_kit_trainer_fast", None) if model is not None else None
    return Collator(tokenizer.pad_token_id, (fast["pad_to"], fast["max_seq"]) if fast else None)


def compute_loss(model, inputs: dict, num_items_in_batch=None):
    """Cross-entropy on the trained (assistant) tokens; returns (loss, outputs). A faster loss can replace this."""
    from .fast_path import causal_lm, packed_trainer_loss

    if "position_ids" in inputs and getattr(causal_lm(model), "_kit_trainer_fast", None):  # planned: the fast path
        from .distributed import through_wrapper

        return through_wrapper(model, lambda inner: packed_trainer_loss(inner, inputs, num_items_in_batch)), None
    kwargs = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
    outputs = model(**inputs, use_cache=False, **kwargs)
    return outputs.loss, outputs


# ---------------------------------------------------------------- checkpoints
def _step_of(path: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else -1


def checkpoint_is_complete(path: Path) -> bool:
    """True when the completion mark is there and every file it lists has its recorded size."""
    mark = path / CHECKPOINT_MARK
    try:
        files = json.loads(mark.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoint dirs, oldest step first (a half-written or truncated one is left out)."""
    if not checkpoints_dir.exists():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and _step_of(p) >= 0]
    return sorted((p for p in found if checkpoint_is_complete(p)), key=_step_of)


def _remove_dir(path: Path) -> None:
    """Rename first, then delete: an interrupted delete leaves a hidden dir, never a half checkpoint."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.time_ns()}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _mark_complete(path: Path) -> None:
    files = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    (path / CHECKPOINT_MARK).write_text(json.dumps({"files": files}, indent=1))


# ---------------------------------------------------------------- the Trainer
def _trainer_class():
    from transformers import Trainer

    class CourseTrainer(Trainer):
        """Trainer with the kit's loss hook, token counting and atomic checkpoints."""

        tokens_seen = 0
        loss_sum_before = 0.0  # the loss summed over the updates a resumed run inherits from its checkpoint

        def _get_grad_norm(self, model, grad_norm=None):
            # The NaN guard, once per update before the optimizer step: a non-finite loss or gradient norm stops
            # training, so no NaN reaches the weights, a checkpoint or the adapter. A fused AdamW (the GPU's
            # optimizer) is told on the device to skip a bad step, and the verdict is read one update later, when
            # the GPU has long computed it: the host never waits for the GPU here. Other optimizers (and FSDP's
            # sharded weights) wait for the verdict: a sync.
            grad_norm = super()._get_grad_norm(model, grad_norm)
            import torch

            self.settle_guard()
            loss = self._tr_loss.detach().float()
            norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=loss.device)
            bad = ~torch.isfinite(loss + norm)
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            if not (isinstance(inner, torch.optim.Optimizer) and inner.defaults.get("fused")) or self.is_fsdp_enabled:
                if bool(bad):
                    raise TrainingDiverged(self.state.global_step + 1, float(loss), float(norm))
                return grad_norm
            inner.found_inf = bad.float()  # read by the fused kernel: a bad step changes nothing
            verdict = torch.stack([bad.float(), loss.reshape(()), norm.reshape(())])
            if verdict.is_cuda:
                if getattr(self, "_guard_buffer", None) is None:
                    self._guard_buffer = torch.empty(3, pin_memory=True)
                self._guard_buffer.copy_(verdict, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                verdict = self._guard_buffer
            else:
                event = None
            self._pending_guard = (self.state.global_step + 1, verdict, event)
            return grad_norm

        def settle_guard(self) -> None:
            """Raise TrainingDiverged if the last update's loss or gradient norm was not finite (its step was skipped)."""
            pending, self._pending_guard = getattr(self, "_pending_guard", None), None
            if pending is None:
                return
            update, verdict, event = pending
            if event is not None:
                event.synchronize()
            if verdict[0]:
                raise TrainingDiverged(update, float(verdict[1]), float(verdict[2]))

        def loss_sum(self) -> float:
            """Sum of every update's loss so far, the updates before a resume included."""
            return self.loss_sum_before + self._total_loss_scalar + float(self._tr_loss)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from .distributed import token_average_scale

            self.tokens_seen += int(inputs["input_ids"].numel()) * self.accelerator.num_processes
            loss, outputs = compute_loss(model, inputs, num_items_in_batch)
            loss = loss * token_average_scale(self, num_items_in_batch)  # as the Trainer's own compute_loss does
            return (loss, outputs) if return_outputs else loss

        def _save_checkpoint(self, model, trial):
            # Write into a hidden staging dir, mark it complete, then rename: a checkpoint-N dir is always whole.
            from .distributed import barrier, is_main, world_size

            self.settle_guard()  # never a checkpoint after a bad update
            final_root = Path(self.args.output_dir)
            tag = os.getpid() if world_size() == 1 else "ranks"  # every rank writes its part into the same dir
            staging_root = final_root / f".staging-{self.state.global_step}-{tag}"
            if staging_root.exists() and is_main():
                shutil.rmtree(staging_root)
            barrier()
            limit = self.args.save_total_limit
            self.args.output_dir, self.args.save_total_limit = str(staging_root), None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir, self.args.save_total_limit = str(final_root), limit
            barrier()
            if not is_main():
                barrier()
                return
            staged = staging_root / f"checkpoint-{self.state.global_step}"
            (staged / LOSS_SUM_FILE).write_text(json.dumps({"loss_sum": self.loss_sum(),
                                                            "step": self.state.global_step}))
            _mark_complete(staged)
            target = final_root / staged.name
            if target.exists():
                _remove_dir(target)
            staged.rename(target)
            shutil.rmtree(staging_root, ignore_errors=True)
            if limit:
                for old in complete_checkpoints(final_root)[:-limit]:
                    _remove_dir(old)
            barrier()

    return CourseTrainer


# ---------------------------------------------------------------- callbacks
def peak_memory_mb() -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident memory (CPU), in MiB."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


DRAW_SHARE = 0.03  # the live loss plot's redraws (~0.2 s each for a 1.8B run's host) take at most this share of time


def _callbacks():
    from transformers import TrainerCallback

    class EvaluationCallback(TrainerCallback):
        """Answers evaluation_inputs before training, every evaluation_freq updates and at the end."""

        def __init__(self, tokenizer, config: TrainConfig, out_dir: Path):
            self.tokenizer, self.config, self.out_dir = tokenizer, config, out_dir
            self.done: set[int] = set()

        def evaluate(self, model, step: int) -> None:
            from .distributed import full_weights, is_main
            from .generation import generate_answers

            from .fast_path import generation_mode

            if step in self.done:
                return
            with full_weights(model) as whole, generation_mode(whole):  # every rank answers, the main one writes
                answers = generate_answers(whole, self.tokenizer, self.config.evaluation_inputs,
                                           system=self.config.system, max_new_tokens=self.config.max_new_tokens,
                                           use_cache=True)
            if not is_main():
                self.done.add(step)
                return
            record = {"step": step, "inputs": self.config.evaluation_inputs, "answers": answers}
            atomic_write_text(self.out_dir / f"step_{step:06d}.json", json.dumps(record, ensure_ascii=False, indent=1))
            self.done.add(step)
            if not headless() or step == 0:
                for q, a in zip(self.config.evaluation_inputs, answers):
                    print(f"[step {step}] {q} -> {a}")

        def on_train_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 0 or not (self.out_dir / f"step_{state.global_step:06d}.json").exists():
                self.evaluate(model, state.global_step)

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % self.config.evaluation_freq == 0:
                self.evaluate(model, state.global_step)

        def on_train_end(self, args, state, control, model=None, **kw):
            self.evaluate(model, state.global_step)

    class MetricsCallback(TrainerCallback):
        """metrics.jsonl (step, loss, lr, grad_norm, tokens/s, peak memory) and the live loss curve."""

        def __init__(self, trainer_ref, metrics_path: Path, plot_path: Path, title: str):
            self.trainer_ref, self.metrics_path, self.plot_path, self.title = trainer_ref, metrics_path, plot_path, title
            self.rows: list[dict] = []
            self.handle = None
            self.last_draw, self.draw_cost = 0.0, 0.0
            self.last_time, self.last_tokens = None, 0

        def on_train_begin(self, args, state, control, **kw):
            # A resumed run keeps the rows up to its checkpoint and drops the ones it will redo.
            if self.metrics_path.exists():
                self.rows = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= state.global_step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows))
            self.last_time, self.last_tokens = time.perf_counter(), self.trainer_ref().tokens_seen

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            now, tokens = time.perf_counter(), self.trainer_ref().tokens_seen
            row = {"step": state.global_step, "loss": round(float(logs["loss"]), 6),
                   "lr": float(logs.get("learning_rate", 0.0)),
                   "grad_norm": None if logs.get("grad_norm") is None else round(float(logs["grad_norm"]), 6),
                   "tokens_per_s": round((tokens - self.last_tokens) / max(now - self.last_time, 1e-9), 1),
                   "peak_memory_mb": round(peak_memory_mb(), 1), "epoch": round(float(logs.get("epoch", 0)), 4),
                   "time": round(time.time(), 2)}
            self.last_time, self.last_tokens = now, tokens
            self.rows.append(row)
            append_line(self.metrics_path, json.dumps(row))
            if not headless() and time.perf_counter() - self.last_draw > max(2.0, self.draw_cost / DRAW_SHARE):
                self.draw()

        def on_train_end(self, args, state, control, **kw):
            self.draw(final=True)

        def draw(self, final: bool = False) -> None:
            start = time.perf_counter()
            png = loss_plot_png(self.rows, self.title)
            if png is None:
                return
            self.draw_cost = time.perf_counter() - start  # the next redraw waits so that drawing stays a small share
            if final:
                self.plot_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.plot_path.with_suffix(".tmp.png")
                tmp.write_bytes(png)
                os.replace(tmp, self.plot_path)
            self.last_draw = time.perf_counter()
            try:
                from IPython import get_ipython
                from IPython.display import Image, display
            except ImportError:
                return
            if get_ipython() is None:
                return
            if self.handle is None:
                self.handle = display(Image(data=png), display_id=True)
            else:
                self.handle.update(Image(data=png))

    class ProgressCallback(TrainerCallback):
        """One tqdm bar over the updates (widget interactively, a few plain lines headless)."""

        def __init__(self):
            self.bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = progress_bar(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    return EvaluationCallback, MetricsCallback, ProgressCallback


def loss_plot_png(rows: list[dict], title: str = "training loss") -> bytes | None:
    """The loss curve (and learning rate) as PNG bytes."""
    if not rows:
        return None
    import io

    from matplotlib.figure import Figure

    from .plots import use_cjk_font

    use_cjk_font()
    fig = Figure(figsize=(7, 3.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("step (optimizer update)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------- the verb
EVALUATION_KNOBS = ("evaluation_inputs", "system", "max_new_tokens")  # what the evaluation rounds ask and answer
# Left out of a run's fingerprint: bookkeeping that cannot change the adapter or its answers, and the paths of the
# base model and data (their content is in the fingerprint instead).
NOT_FINGERPRINTED = ("evaluation_freq", "logging_steps", "save_total_limit", "base_model", "data_path")


def _run_fingerprint(config: TrainConfig, base_files: dict, data_sha: str) -> dict:
    """What decides a run's result, by content: the base model's files ({name: sha256}), the data's hash, every
    training knob and what the evaluation rounds ask. A run resumes only into one with the same fingerprint."""
    knobs = {k: v for k, v in config.hyper_parameters().items() if k not in NOT_FINGERPRINTED}
    evaluation = {k: knobs.pop(k) for k in EVALUATION_KNOBS}
    fingerprint = {"base_model": dict(base_files), "data_sha256": data_sha, "training": knobs, "evaluation": evaluation}
    return json.loads(json.dumps(fingerprint, default=str))  # as run.json reads back, so the two compare equal


def _file_kind(name: str) -> str:
    if name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")) or ".safetensors.index" in name:
        return "weights"
    if name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template")) \
            or name.endswith((".model", ".tiktoken")):
        return "tokenizer"
    return "config" if name.endswith(".json") and "config" in name else "files"


def _words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def fingerprint_difference(old: dict | None, new: dict) -> str | None:
    """What differs between an earlier run's fingerprint and this one's, as one phrase (None when identical),
    e.g. "the base model's weights changed (model.safetensors)"."""
    if old == new:
        return None
    if not old:
        return f"the earlier run left no readable record of what it trained on ({RUN_FILE})"
    if set(old) != set(new):
        return f"the earlier run's record ({RUN_FILE}) comes from an older version of the kit"
    parts = []
    if old["base_model"] != new["base_model"]:
        a, b = old["base_model"], new["base_model"]
        files = sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        parts.append(f"the base model's {_words(list(dict.fromkeys(_file_kind(n) for n in files)))} changed ({shown})")
    if old["data_sha256"] != new["data_sha256"]:
        parts.append("the training data changed")
    if old["evaluation"] != new["evaluation"]:
        a, b = old["evaluation"], new["evaluation"]
        names = {"evaluation_inputs": "evaluation inputs", "system": "system prompt"}
        parts.append(f"the {_words([names.get(k, k) for k in b if a.get(k) != b[k]])} changed")
    if old["training"] != new["training"]:
        a, b = old["training"], new["training"]
        changes = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
        parts.append(f"the training settings changed ({', '.join(changes)})")
    return "; ".join(parts)


def _prepare_train_dir(work: Work, config: TrainConfig, fingerprint: dict) -> str | None:
    """Pick the checkpoint to resume from (or None), clearing an earlier run's files when starting over.
    Only a run with the same fingerprint resumes; a new one says what changed."""
    run_file = work.train / RUN_FILE
    ckpts = complete_checkpoints(work.checkpoints)
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    difference = fingerprint_difference(previous, fingerprint)
    if work.checkpoints.exists():  # leftovers of an interrupted write
        for p in work.checkpoints.iterdir():
            if p.name.startswith((".staging-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)
    resume_from = None
    if config.resume is True:
        if not ckpts:
            raise TrainConfigError(f"resume=True but {work.checkpoints} has no complete checkpoint; "
                                   "set resume='auto' (or False) to start a new run.")
        if difference:
            raise TrainConfigError(f"resume=True but the checkpoints in {work.checkpoints} come from another run: "
                                   f"{difference}; set resume=False to start over with the new ones.")
        resume_from = str(ckpts[-1])
    elif config.resume == "auto" and ckpts and not difference:
        resume_from = str(ckpts[-1])
    if resume_from is None:
        if ckpts or work.eval_outputs.exists() or work.metrics.exists():
            why = (f": {difference}" if difference and ckpts else " (resume=False)" if config.resume is False
                   else " (the earlier run saved no complete checkpoint)")
            print(f"note: starting a new run{why}; the earlier run's checkpoints and logs in {work.train} are replaced.")
        for p in (work.checkpoints, work.eval_outputs):
            if p.exists():
                _remove_dir(p)
        for p in (work.metrics, work.loss_plot):
            p.unlink(missing_ok=True)
    else:
        print(f"resuming from {Path(resume_from).name}")
        step = _step_of(Path(resume_from))
        for p in work.eval_outputs.glob("step_*.json"):  # rounds after the checkpoint are redone
            if int(p.stem.split("_")[1]) > step:
                p.unlink()
    work.checkpoints.mkdir(parents=True, exist_ok=True)
    work.eval_outputs.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, json.dumps(fingerprint, ensure_ascii=False, indent=1))
    return resume_from


def _finished_step(checkpoint: str | None) -> int | None:
    """The checkpoint's step when it is the last step of its run, else None."""
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state["global_step"] if state["global_step"] >= state["max_steps"] > 0 else None


def _loss_sum_of(checkpoint: str | None) -> float:
    """The loss summed over the updates before `checkpoint` (0 for a new run)."""
    if checkpoint is None or not (Path(checkpoint) / LOSS_SUM_FILE).exists():
        return 0.0
    return float(json.loads((Path(checkpoint) / LOSS_SUM_FILE).read_text())["loss_sum"])


def _diverged_sentence(e: TrainingDiverged, work: Work, config: TrainConfig) -> str:
    what = "loss" if not math.isfinite(e.loss) else "gradient norm"
    value = e.loss if what == "loss" else e.grad_norm
    kept = complete_checkpoints(work.checkpoints)
    where = (f"the last good checkpoint {kept[-1]} is kept (resume='auto' continues from it)" if kept
             else "no checkpoint had been saved yet")
    return (f"training stopped at update {e.update}: the {what} became {value} (not a finite number), so no adapter "
            f"was saved and {where}; try a lower lr (now {config.lr:g}, e.g. {config.lr / 4:g}), or "
            f"quantization='none' if this was 4-bit, or max_grad_norm=0.3.")


def _load_adapter_weights(model, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))


def _default_evaluation_inputs(work: Work) -> list[str]:
    from .data import DEFAULT_EVALUATION_INPUTS
    from .results import load_results

    try:
        return list(load_results(work, "01_data_generation").get("evaluation_inputs") or DEFAULT_EVALUATION_INPUTS)
    except FileNotFoundError:
        return list(DEFAULT_EVALUATION_INPUTS)


def training_arguments(config: TrainConfig, output_dir: Path, plan=None):
    from transformers import TrainingArguments

    import torch

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = dict(
        output_dir=str(output_dir), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation, learning_rate=config.lr,
        num_train_epochs=config.epochs or 1, max_steps=config.max_steps if config.max_steps else -1,
        warmup_steps=config.warmup_ratio, lr_scheduler_type="cosine", max_grad_norm=config.max_grad_norm,
        weight_decay=0.0, optim="adamw_torch", logging_steps=config.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=config.save_total_limit,
        seed=config.seed, data_seed=config.seed, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=0, bf16=bf16,
        dataloader_pin_memory=torch.cuda.is_available(),
        logging_nan_inf_filter=False,  # a NaN loss must be seen (and stop training), not averaged away
        gradient_checkpointing=False,  # enabled on the model itself, before the adapter goes on
    )
    if plan is not None:  # the fast path: more rows per forward, fewer per accumulation (same update)
        from .fast_path import trainer_arguments

        args.update(trainer_arguments(plan))
    from .distributed import trainer_arguments

    args.update(trainer_arguments(config))
    args.update(config.extra)
    arguments = TrainingArguments(**args)
    if arguments.n_gpu > 1:  # one process, one GPU: several GPUs go through num_gpus (DDP/ZeRO-2/FSDP), never DataParallel
        arguments._n_gpu = 1
    return arguments


GPU_SHARE_ENV = "KIT_GPU_MEMORY_FRACTION"  # set by a class run that puts several students on one GPU


def gpu_share() -> float | None:
    """This process's share of its GPU's memory when a class run puts several students on one card, else None."""
    value = os.environ.get(GPU_SHARE_ENV)
    if not value:
        return None
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise ValueError(f"{GPU_SHARE_ENV} is {value}; use a share of the GPU's memory between 0 and 1 (e.g. 0.5).")
    return fraction


def share_gpu() -> float | None:
    """When several students share one GPU (a class run with more workers than GPUs), this process keeps to its
    share of the card's memory, so the training plan sizes itself to the share and no student runs out."""
    import torch

    if not torch.cuda.is_available():
        return None
    fraction = gpu_share()
    if fraction is None:
        return None
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def train(config: TrainConfig | None = None, work: Work | None = None, callbacks: list | None = None) -> dict:
    """Fine-tune a LoRA adapter; writes WORK/train (checkpoints, eval_outputs, metrics, loss.png) and
    WORK/adapter, and returns a summary (adapter path, losses, steps, answers before and after)."""
    import weakref

    import torch
    from transformers import PrinterCallback

    from .base_model import base_model_identity, resolve_base_model
    from .paths import work as make_work

    wall_start = time.perf_counter()
    work = work or make_work()
    config = (config or TrainConfig()).resolved()
    if config.evaluation_inputs is None:
        config.evaluation_inputs = _default_evaluation_inputs(work)
    model_path = resolve_base_model(config.base_model, work)
    data_path = Path(config.data_path or work.dataset)
    data_sha = file_sha256(data_path) if data_path.exists() else ""
    if not data_path.exists():
        raise DataError(f"{data_path}: no such file; run notebook 01 (or set data_path).")

    from . import distributed

    if config.num_gpus > 1 and distributed.world_size() == 1:  # start one process per GPU, each runs this function
        distributed.launch(config, work, _rank_main)
        return launched_summary(work)
    if distributed.world_size() > 1:  # one rank of a launch (ours, accelerate launch or torchrun)
        distributed.join()
        config.num_gpus = distributed.world_size()
    rank_config = distributed.per_rank(config, config.num_gpus)  # this rank's share of the rows per update
    main = distributed.is_main()

    share_gpu()
    model, tokenizer, quantization, note = load_model_for_training(rank_config, str(model_path))
    if main:
        print(f"quantization: {quantization} ({note})")
    rows, data_summary = build_dataset(tokenizer, config, data_path)
    identity = base_model_identity(work, model_path)  # by content: a base changed in place is another base
    fingerprint = _run_fingerprint(config, identity["files"], data_sha)
    resume_from = distributed.main_first(lambda: _prepare_train_dir(work, config, fingerprint))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    plan = (getattr(model.get_base_model(), "_kit_trainer_fast", None) or {}).get("plan")
    if plan is not None:
        from .fast_path import fit_layers_to_run

        per_update = config.batch_size * config.gradient_accumulation
        fit_layers_to_run(model, config.max_steps if config.max_steps and config.max_steps > 0
                          else math.ceil(len(rows) / per_update * (config.epochs or 1)))
    EvaluationCallback, MetricsCallback, ProgressCallback = _callbacks()
    args = training_arguments(rank_config, work.checkpoints, plan)
    align_special_ids(model, tokenizer)  # one line, not the Trainer's warning, where a base's files disagree
    trainer = _trainer_class()(model=model, args=args, train_dataset=rows,
                               data_collator=make_collator(tokenizer, model), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    ref = weakref.ref(trainer)
    evaluation = EvaluationCallback(tokenizer, config, work.eval_outputs)
    metrics_cb = MetricsCallback(ref, work.metrics, work.loss_plot, f"训练损失 training loss ({config.preset})")
    for cb in (evaluation, *((metrics_cb, ProgressCallback()) if main else ()), *(callbacks or [])):
        trainer.add_callback(cb)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    threads = torch.get_num_threads()
    if config.cpu_threads and not torch.cuda.is_available():
        # The tiny model's matrices are too small to gain from threads, and on a busy CPU they cost 20x.
        torch.set_num_threads(config.cpu_threads)
    start = time.perf_counter()
    finished = _finished_step(resume_from)
    trainer.loss_sum_before = _loss_sum_of(resume_from)
    try:
        with warnings.catch_warnings():  # peft notes that an output-layer adapter also saves that layer: intended
            warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
            if finished is None:
                steps_loss = trainer.train(resume_from_checkpoint=resume_from).training_loss  # / all steps
                trainer.settle_guard()  # the last update's verdict
                mean_loss = (trainer.loss_sum_before + steps_loss * trainer.state.global_step) / max(
                    1, trainer.state.global_step)
            else:  # Trainer would take one more step; the run is done, so take its last adapter as it is
                print(f"this run already finished at step {finished}; resume=False trains it again.")
                _load_adapter_weights(model, Path(resume_from))
                trainer.state.global_step = finished
                mean_loss = trainer.loss_sum_before / max(1, finished) if trainer.loss_sum_before else None
                if main:
                    metrics_cb.rows = read_metrics(work)
                    metrics_cb.draw(final=True)
    except TrainingDiverged as e:
        raise TrainingDiverged(e.update, e.loss, e.grad_norm, _diverged_sentence(e, work, config)) from None
    finally:
        torch.set_num_threads(threads)
        from .fast_path import set_training_mode

        set_training_mode(model, False)  # the returned model answers with its own attention and eager layers
    seconds = time.perf_counter() - start

    metrics = read_metrics(work)
    record = {
        "hyper_parameters": config.hyper_parameters(), "preset": config.preset, "quantization": quantization,
        "base_model": str(model_path), "base_model_identity": identity, "data_file": str(data_path),
        "data_sha256": data_sha, "evaluation_inputs": config.evaluation_inputs, "data": data_summary, "steps": trainer.state.global_step,
        "first_loss": metrics[0]["loss"] if metrics else None, "final_loss": metrics[-1]["loss"] if metrics else None,
        "mean_loss": None if mean_loss is None else round(mean_loss, 6), "train_seconds": round(seconds, 1),
        "resumed_from": resume_from,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "trainable_parameters": trainable,
    }
    if plan is not None:
        record["fast_path"] = plan.as_dict()
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if config.distributed == "fsdp" \
        and config.num_gpus > 1 else None  # FSDP: the shards gathered (every rank takes part)
    adapter = work.adapter
    if main:
        adapter = save_adapter(model, tokenizer, work.adapter, record, state)
        record["wall_seconds"] = round(time.perf_counter() - wall_start, 1)  # what the student waited: load to adapter
        atomic_write_text(adapter / "training_record.json",
                          json.dumps(record, ensure_ascii=False, indent=1, default=str))
    distributed.barrier()
    evals = evaluation_rounds(work)
    return record | {"adapter": str(adapter), "answers_before": evals[0]["answers"] if evals else [],
                     "answers_after": evals[-1]["answers"] if evals else [],
                     "evaluation_inputs": config.evaluation_inputs, "model": model}


def save_adapter(model, tokenizer, out_dir: Path, record: dict, state_dict: dict | None = None) -> Path:
    """PEFT adapter + tokenizer + training_record.json, written beside and swapped in by rename; the record gets
    the adapter's own hash (record["adapter_sha256"]: fingerprint.folder_sha256 of the files as saved)."""
    from .fingerprint import folder_sha256

    with staged_dir(out_dir) as tmp:  # the base's own layers stay with the base
        model.save_pretrained(tmp, save_embedding_layers=False, **({"state_dict": state_dict} if state_dict else {}))
        tokenizer.save_pretrained(tmp)
        record["adapter_sha256"] = folder_sha256(tmp, cached=False)  # a staging path: nothing worth caching
        (tmp / "training_record.json").write_text(json.dumps(record, ensure_ascii=False, indent=1, default=str))
    return out_dir


# ---------------------------------------------------------------- reading the results
def read_metrics(work: Work) -> list[dict]:
    return read_jsonl(work.metrics)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of an append-only log; a line cut short (a kill or a full disk mid-write) is skipped, saying so."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None
            where = "the last line" if number == len(lines) else f"line {number}"
            print(f"note: {path}: {where} is not a whole row (a run stopped while writing it); it is skipped.")
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_line(path: Path, text: str) -> None:
    """Append one whole line in one write; a write that cannot finish (a full disk) is undone, so no half line stays."""
    data = (text + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, f"{path}: the disk took only part of a line")
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def evaluation_rounds(work: Work) -> list[dict]:
    """Every saved evaluation round, in step order."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(work.eval_outputs.glob("step_*.json"))]


def evaluation_table(work: Work):
    """Answers to the evaluation inputs: rows are the questions, columns the steps (the identity arriving)."""
    import pandas as pd

    rounds = evaluation_rounds(work)
    if not rounds:
        return pd.DataFrame()
    table = pd.DataFrame({f"step {r['step']}": r["answers"] for r in rounds}, index=rounds[0]["inputs"])
    table.index.name = "question"
    return table


def load_adapter_model(work: Work, adapter_dir: Path | None = None):
    """The base model with the trained adapter (for answering questions after training)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    adapter_dir = adapter_dir or work.adapter
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir))
    return model, AutoTokenizer.from_pretrained(str(adapter_dir))


def identity_learned(answers: list[str], expected: str) -> bool:
    return bool(answers) and all(expected in a for a in answers)


# ---------------------------------------------------------------- launched on several GPUs
def _rank_main(config_values: dict, work_root: str) -> None:
    """One rank of a launch: train as that rank (train() joins the process group)."""
    from .paths import work as make_work

    train(TrainConfig(**config_values), make_work(work_root))


def launched_summary(work) -> dict:
    """train()'s summary after the ranks finished: the record beside the adapter, the rounds, the adapter loaded."""
    import torch

    from .distributed import gpu_count

    record = json.loads((work.adapter / "training_record.json").read_text(encoding="utf-8"))
    evals = evaluation_rounds(work)
    model, _ = load_adapter_model(work)
    if gpu_count():
        model = model.to("cuda", torch.bfloat16)
    return record | {"adapter": str(work.adapter), "answers_before": evals[0]["answers"] if evals else [],
                     "answers_after": evals[-1]["answers"] if evals else [],
                     "evaluation_inputs": record["hyper_parameters"].get("evaluation_inputs"), "model": model.eval()}


# ---------------------------------------------------------------- command line
def add_command(sub) -> None:
    from .distributed import STRATEGIES

    p = sub.add_parser("train", help="train the adapter (notebook 02's training) headless, on one GPU or several")
    p.add_argument("--work-dir", default=None, help="work directory (default: ./work)")
    p.add_argument("--num-gpus", type=int, default=None, help="processes, one per GPU (default 1)")
    p.add_argument("--distributed", default=None, choices=STRATEGIES, help="ddp (default), zero2 or fsdp")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a TrainConfig field, e.g. -p preset homework -p lr 2e-4 (repeatable)")
    p.add_argument("--config-json", default=None, help=argparse.SUPPRESS)  # how a launch hands each rank its config
    p.set_defaults(func=_train_command)


def _train_command(args) -> int:
    from .distributed import DistributedError, world_size
    from .parameters import parse_value
    from .paths import work as make_work

    values = json.loads(args.config_json) if args.config_json else {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in args.param:
        if name not in fields:
            print(f"error: -p {name}: TrainConfig has no such field; use one of {', '.join(sorted(fields))}.",
                  file=sys.stderr)
            return 2
        values[name] = value if name in ("system", "base_model", "data_path") else parse_value(value)  # 2e-4: a number
    if args.num_gpus is not None:
        values["num_gpus"] = args.num_gpus
    if args.distributed is not None:
        values["distributed"] = args.distributed
    work = make_work(args.work_dir)
    try:
        if world_size() > 1:  # started by accelerate launch: this process is one rank
            _rank_main(values, str(work.root))
            return 0
        result = train(TrainConfig(**values), work)
    except (TrainConfigError, DistributedError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result['steps']} updates in {result['train_seconds']:.0f} s, loss {result['first_loss']} -> "
          f"{result['final_loss']}; adapter: {result['adapter']}")
    return 0
