"""The verb: `train(config, work)` makes the plan, loads the model it names, trains, and saves the adapter."""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

from ..data import DataError, atomic_write_text, file_sha256
from ..paths import Work, staged_dir
from ..template import align_special_ids
from .checkpoints import complete_checkpoints, finished_step, loss_sum_of, prepare_train_dir, run_fingerprint
from .config import TrainConfig, TrainingDiverged
from .data import Collator, build_dataset
from .results import evaluation_rounds, peak_memory_mb, read_metrics

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


def updates_of(config: TrainConfig, rows: int) -> int:
    """Optimizer updates a run of `rows` training rows takes (max_steps, or epochs over the rows)."""
    if config.max_steps and config.max_steps > 0:
        return config.max_steps
    return math.ceil(rows / (config.batch_size * config.gradient_accumulation) * (config.epochs or 1))


def plan_for(config: TrainConfig, model_path, rows: int, ranks: int = 1):
    """The run's plan, from the config, the model's dimensions (its config.json only), the hardware and the run's
    length; this rank's share of the update when `ranks` > 1."""
    from transformers import AutoConfig

    from ..distributed import per_rank
    from .plan import make_plan

    return make_plan(per_rank(config, ranks), AutoConfig.from_pretrained(str(model_path)),
                     updates=updates_of(config, rows), ranks=ranks)


def _diverged_sentence(e: TrainingDiverged, work: Work, config: TrainConfig) -> str:
    what = "loss" if not math.isfinite(e.loss) else "gradient norm"
    value = e.loss if what == "loss" else e.grad_norm
    kept = complete_checkpoints(work.checkpoints)
    where = (f"the last good checkpoint {kept[-1]} is kept (resume='auto' continues from it)" if kept
             else "no checkpoint had been saved yet")
    return (f"training stopped at update {e.update}: the {what} became {value} (not a finite number), so no adapter "
            f"was saved and {where}; try a lower lr (now {config.lr:g}, e.g. {config.lr / 4:g}), or "
            f"quantization='none' if this was 4-bit, or max_grad_norm=0.3.")


def _default_evaluation_inputs(work: Work) -> list[str]:
    from ..data import DEFAULT_EVALUATION_INPUTS
    from ..results import load_results

    try:
        return list(load_results(work, "01_data_generation").get("evaluation_inputs") or DEFAULT_EVALUATION_INPUTS)
    except FileNotFoundError:
        return list(DEFAULT_EVALUATION_INPUTS)


def train(config: TrainConfig | None = None, work: Work | None = None, callbacks: list | None = None) -> dict:
    """Fine-tune a LoRA adapter; writes WORK/train (checkpoints, eval_outputs, metrics, loss.png) and
    WORK/adapter, and returns a summary (adapter path, losses, steps, the plan, answers before and after)."""
    import weakref

    import torch

    from .. import distributed
    from ..base_model import base_model_identity, resolve_base_model
    from ..paths import work as make_work
    from .callbacks import EvaluationCallback, MetricsCallback, ProgressCallback
    from .model import load_model_for_training
    from .packed import training_mode
    from .trainer import course_trainer, training_arguments

    wall_start = time.perf_counter()
    work = work or make_work()
    config = (config or TrainConfig()).resolved()
    if config.evaluation_inputs is None:
        config.evaluation_inputs = _default_evaluation_inputs(work)
    model_path = resolve_base_model(config.base_model, work)
    data_path = Path(config.data_path or work.dataset)
    if not data_path.exists():
        raise DataError(f"{data_path}: no such file; run notebook 01 (or set data_path).")
    data_sha = file_sha256(data_path)

    if config.num_gpus > 1 and distributed.world_size() == 1:  # start one process per GPU, each runs this function
        from .cli import launched_summary, rank_main

        distributed.launch(config, work, rank_main)
        return launched_summary(work)
    if distributed.world_size() > 1:  # one rank of a launch (ours, accelerate launch or torchrun)
        distributed.join()
        config.num_gpus = distributed.world_size()
    main = distributed.is_main()

    share_gpu()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    rows, data_summary = build_dataset(tokenizer, config, data_path)
    plan = plan_for(config, model_path, len(rows), config.num_gpus)
    model, tokenizer = load_model_for_training(config, plan, str(model_path), tokenizer)
    if main:
        print(f"plan: {plan.summary()}")
    identity = base_model_identity(work, model_path)  # by content: a base changed in place is another base
    fingerprint = run_fingerprint(config, identity["files"], data_sha)
    resume_from = distributed.main_first(lambda: prepare_train_dir(work, config, fingerprint))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    args = training_arguments(config, work.checkpoints, plan)
    align_special_ids(model, tokenizer)  # one line, not the Trainer's warning, where a base's files disagree
    trainer = course_trainer(model, args, rows, Collator(tokenizer.pad_token_id, plan.pad_to, plan.max_seq),
                             tokenizer, config.save_total_limit)
    evaluation = EvaluationCallback(tokenizer, config, work.eval_outputs)
    metrics_cb = MetricsCallback(weakref.ref(trainer), work.metrics, work.loss_plot,
                                 f"训练损失 training loss ({config.preset})")
    for cb in (evaluation, *((metrics_cb, ProgressCallback()) if main else ()), *(callbacks or [])):
        trainer.add_callback(cb)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    threads = torch.get_num_threads()
    if config.cpu_threads and not torch.cuda.is_available():
        # The tiny model's matrices are too small to gain from threads, and on a busy CPU they cost 20x.
        torch.set_num_threads(config.cpu_threads)
    start = time.perf_counter()
    finished = finished_step(resume_from)
    trainer.loss_sum_before = loss_sum_of(resume_from)
    try:
        with warnings.catch_warnings(), training_mode(model, plan):
            warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")  # intended: the head's adapter
            if finished is None:
                trainer.train(resume_from_checkpoint=resume_from)
                trainer.settle_guard()  # the last update's verdict
                mean_loss = trainer.loss_sum() / max(1, trainer.state.global_step)
            else:  # Trainer would take one more step; the run is done, so take its last adapter as it is
                print(f"this run already finished at step {finished}; resume=False trains it again.")
                model.load_adapter(resume_from, model.active_adapter, is_trainable=True)
                trainer.state.global_step = finished
                mean_loss = trainer.loss_sum_before / max(1, finished) if trainer.loss_sum_before else None
                if main:
                    metrics_cb.rows = read_metrics(work)
                    metrics_cb.draw(final=True)
    except TrainingDiverged as e:
        raise TrainingDiverged(e.update, e.loss, e.grad_norm, _diverged_sentence(e, work, config)) from None
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start

    metrics = read_metrics(work)
    record = {
        "hyper_parameters": config.hyper_parameters(), "preset": config.preset,
        "quantization": "nf4" if plan.weights == "nf4" else "none", "plan": plan.as_dict(),
        "base_model": str(model_path), "base_model_identity": identity, "data_file": str(data_path),
        "data_sha256": data_sha, "evaluation_inputs": config.evaluation_inputs, "data": data_summary,
        "steps": trainer.state.global_step,
        "first_loss": metrics[0]["loss"] if metrics else None, "final_loss": metrics[-1]["loss"] if metrics else None,
        "mean_loss": None if mean_loss is None else round(mean_loss, 6), "train_seconds": round(seconds, 1),
        "resumed_from": resume_from, "peak_memory_mb": round(peak_memory_mb(), 1), "trainable_parameters": trainable,
    }
    if model.compile_failed:  # the plan's compiled layers could not run here; eager ones trained instead
        record["compile_failed"] = model.compile_failed
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if plan.strategy == "fsdp" else None
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
    from ..fingerprint import folder_sha256

    with staged_dir(out_dir) as tmp:  # the base's own layers stay with the base
        model.save_pretrained(tmp, save_embedding_layers=False, **({"state_dict": state_dict} if state_dict else {}))
        tokenizer.save_pretrained(tmp)
        record["adapter_sha256"] = folder_sha256(tmp, cached=False)  # a staging path: nothing worth caching
        (tmp / "training_record.json").write_text(json.dumps(record, ensure_ascii=False, indent=1, default=str))
    return out_dir
