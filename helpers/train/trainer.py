"""transformers' Trainer, through its public surface: `compute_loss` (the model's own forward is the loss; tokens
and each update's loss counted), a NaN guard before every optimizer step (`on_pre_optimizer_step`), and complete,
rotated checkpoints (`on_save`). TrainingArguments come from the plan."""
from __future__ import annotations

import json
import weakref
from pathlib import Path

from transformers import Trainer, TrainerCallback

from .checkpoints import LOSS_SUM_FILE, complete_checkpoints, mark_complete, remove_dir
from .config import TrainConfig, TrainingDiverged
from .plan import TrainingPlan


def training_arguments(config: TrainConfig, output_dir: Path, plan: TrainingPlan):
    """The Trainer's arguments: the config's schedule, the plan's rows per forward, accumulation and optimizer."""
    import torch
    from transformers import TrainingArguments

    from ..distributed import trainer_arguments

    args = dict(
        output_dir=str(output_dir), per_device_train_batch_size=plan.rows_per_forward,
        gradient_accumulation_steps=plan.accumulation, learning_rate=config.lr,
        num_train_epochs=config.epochs or 1, max_steps=config.max_steps if config.max_steps else -1,
        warmup_steps=config.warmup_ratio, lr_scheduler_type="cosine", max_grad_norm=config.max_grad_norm,
        weight_decay=0.0, optim=plan.optimizer, logging_steps=config.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=None,  # CheckpointCallback keeps the newest complete ones (never a half-written one)
        seed=config.seed, data_seed=config.seed, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=0,
        bf16=plan.device == "cuda" and torch.cuda.is_bf16_supported(), dataloader_pin_memory=torch.cuda.is_available(),
        logging_nan_inf_filter=False,  # a NaN loss must be seen (and stop training), not averaged away
        gradient_checkpointing=False,  # the plan's recomputation is set on the model itself
    )
    args.update(trainer_arguments(config))
    args.update(config.extra)
    arguments = TrainingArguments(**args)
    if arguments.n_gpu > 1:  # one process, one GPU: several GPUs go through num_gpus (DDP/ZeRO-2/FSDP)
        arguments._n_gpu = 1  # the one private member written here: TrainingArguments has no public switch
    return arguments


def course_trainer(model, args, rows, collator, tokenizer=None, save_total_limit: int | None = None):
    """The course's Trainer with its NaN guard and checkpoint bookkeeping in place."""
    from transformers import PrinterCallback

    trainer = CourseTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                            processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(NaNGuard(trainer))
    trainer.add_callback(CheckpointCallback(trainer, save_total_limit))
    return trainer


class CourseTrainer(Trainer):
    """The loss is the model's own forward (a PackedCausalLM's packed loss, or a LLaVA model's); the Trainer's
    token-averaged normalisation is kept (num_items_in_batch), and every update's loss is summed on the device."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0
        self.loss_sum_before = 0.0  # the updates a resumed run inherits from its checkpoint
        self.update_loss = 0.0      # this update's loss so far (a tensor once a forward ran)
        self.updates_loss = 0.0     # every finished update's loss, this session
        self.pending_guard = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from ..distributed import token_average_scale

        self.tokens_seen += int(inputs["labels"].numel()) * self.accelerator.num_processes
        extra = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
        outputs = model(**inputs, **extra)
        loss = outputs.loss
        exact = outputs.get("exact") if hasattr(outputs, "get") else None
        if exact is not None and loss.dtype != exact.value.dtype:  # a wrapper recast it: its value, our gradient
            loss = exact.value + (loss - loss.detach())
        loss = loss * token_average_scale(self, num_items_in_batch)  # as the Trainer's own does
        self.update_loss = self.update_loss + loss.detach().float()
        return (loss, outputs) if return_outputs else loss

    def loss_sum(self) -> float:
        """Sum of every finished update's loss, the updates before a resume included."""
        return self.loss_sum_before + float(self.updates_loss)

    def settle_guard(self) -> None:
        """Raise TrainingDiverged if the last update's loss or gradient norm was not finite (its step was skipped)."""
        pending, self.pending_guard = self.pending_guard, None
        if pending is None:
            return
        update, verdict, event = pending
        if event is not None:
            event.synchronize()
        if verdict[0]:
            raise TrainingDiverged(update, float(verdict[1]), float(verdict[2]))


class NaNGuard(TrainerCallback):
    """Once per update, before the optimizer step: a non-finite loss or gradient norm stops training, so no NaN
    reaches the weights, a checkpoint or the adapter. A fused AdamW (the GPU's) is told on the device to skip a bad
    step (its `found_inf`, as a GradScaler does), and the verdict is read one update later, when the GPU has long
    computed it: the host never waits here. Other optimizers (and FSDP's sharded weights) wait for it: a sync."""

    def __init__(self, trainer):
        self.trainer = weakref.ref(trainer)
        self.buffer = None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        import torch

        trainer = self.trainer()
        trainer.settle_guard()
        loss = torch.as_tensor(trainer.update_loss, dtype=torch.float32)
        trainer.update_loss = 0.0
        trainer.updates_loss = trainer.updates_loss + loss
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        norm = norm.float().to(loss.device)
        bad = ~torch.isfinite(loss + norm)
        inner = getattr(optimizer, "optimizer", optimizer)
        fused = isinstance(inner, torch.optim.Optimizer) and inner.defaults.get("fused")
        if not fused or trainer.is_fsdp_enabled:
            if bool(bad):
                raise TrainingDiverged(state.global_step + 1, float(loss), float(norm))
            return
        inner.found_inf = bad.float()  # read by the fused kernel: a bad step changes nothing
        verdict = torch.stack([bad.float(), loss.reshape(()), norm.reshape(())])
        event = None
        if verdict.is_cuda:
            if self.buffer is None:
                self.buffer = torch.empty(3, pin_memory=True)
            self.buffer.copy_(verdict, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            verdict = self.buffer
        trainer.pending_guard = (state.global_step + 1, verdict, event)


class CheckpointCallback(TrainerCallback):
    """After the Trainer writes checkpoint-N: its update is settled (never a checkpoint after a bad one), the loss
    sum is added, the completion mark is written last, and only the newest `limit` complete checkpoints stay.
    A checkpoint without its mark (a kill mid-write) is never resumed from."""

    def __init__(self, trainer, limit: int | None):
        self.trainer, self.limit = weakref.ref(trainer), limit

    def on_save(self, args, state, control, **kw):
        from ..distributed import barrier, is_main

        trainer = self.trainer()
        trainer.settle_guard()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if is_main() and folder.is_dir():
            (folder / LOSS_SUM_FILE).write_text(json.dumps({"loss_sum": trainer.loss_sum(),
                                                             "step": state.global_step}))
            mark_complete(folder)
            if self.limit:
                for old in complete_checkpoints(Path(args.output_dir))[:-self.limit]:
                    remove_dir(old)
        barrier()
