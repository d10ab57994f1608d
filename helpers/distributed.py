"""Training on several GPUs through accelerate: DDP (the default), DeepSpeed ZeRO-2 (the course's choice) or FSDP.

`train(config)` with `num_gpus` > 1 starts one process per GPU and waits for them: from a notebook (JupyterLab,
papermill) with accelerate's `notebook_launcher`, from a script with `accelerate launch -m helpers train`. Each
process runs `train()` as one rank; the Trainer wraps the model (DDP, ZeRO-2 or FSDP) and each rank reads its own
share of the rows, `gradient_accumulation` shrinking so that the update stays the course's size. Only the main
process writes logs, plots, evaluation rounds, checkpoints and the adapter.
On a machine without a GPU, `num_gpus` = N starts N CPU processes that talk over gloo (how the tests check it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

STRATEGIES = ("ddp", "zero2", "fsdp")
DEEPSPEED_INSTALL = "pip install deepspeed"


class DistributedError(ValueError):
    """A multi-GPU setting that cannot work here; the message names it and the fix."""


# ---------------------------------------------------------------- where this process stands
def world_size() -> int:
    """Processes in this training (1 outside a launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def gpu_count() -> int:
    """Visible CUDA GPUs, counted without starting CUDA here (a started CUDA cannot be forked into the ranks)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.device_count()


# ---------------------------------------------------------------- checks, one sentence each
def check(config, gpus: int | None = None) -> None:
    """num_gpus / distributed / quantization / batch: raise DistributedError naming the parameter and the fix."""
    if config.distributed not in STRATEGIES:
        raise DistributedError(f"distributed is {config.distributed!r}; use 'ddp' (data parallel), 'zero2' "
                               "(DeepSpeed ZeRO-2) or 'fsdp'.")
    if not isinstance(config.num_gpus, int) or isinstance(config.num_gpus, bool) or config.num_gpus < 1:
        raise DistributedError(f"num_gpus is {config.num_gpus!r}; use a whole number of at least 1.")
    if config.num_gpus == 1:
        return
    gpus = gpu_count() if gpus is None else gpus
    if gpus and config.num_gpus > gpus:
        raise DistributedError(f"num_gpus is {config.num_gpus} but this machine shows {gpus} GPU(s); "
                               f"set num_gpus to at most {gpus}.")
    if config.distributed == "zero2":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise DistributedError("distributed='zero2' needs DeepSpeed, which is not installed; "
                                   f"{DEEPSPEED_INSTALL} (or use distributed='ddp').")
        if not gpus:
            raise DistributedError("distributed='zero2' needs CUDA GPUs and none is visible; use distributed='ddp'.")
    if config.distributed == "fsdp" and not gpus:
        raise DistributedError("distributed='fsdp' needs CUDA GPUs and none is visible (on CPU processes accelerate "
                               "would quietly run DDP instead); use distributed='ddp'.")
    if config.distributed == "fsdp" and config.quantization == "nf4":
        raise DistributedError("distributed='fsdp' cannot shard 4-bit (nf4) weights in the kit; use "
                               "distributed='zero2' or 'ddp' with quantization='nf4', or quantization='none' with fsdp.")
    per_rank(config, config.num_gpus)


def per_rank(config, ranks: int):
    """The config one rank trains with: its share of the rows per update (batch_size x gradient_accumulation)."""
    rows = config.batch_size * config.gradient_accumulation
    if ranks == 1:
        return config
    if rows % ranks:
        raise DistributedError(
            f"batch_size x gradient_accumulation = {rows} rows per update cannot be shared by {ranks} GPUs; set "
            f"gradient_accumulation so that the product is a multiple of {ranks} (the course's 1 x 16 works for "
            "1, 2, 4, 8 and 16).")
    share = rows // ranks
    batch = max(d for d in range(1, min(config.batch_size, share) + 1) if share % d == 0)
    return dataclasses.replace(config, batch_size=batch, gradient_accumulation=share // batch)


# ---------------------------------------------------------------- starting the ranks
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def join() -> None:
    """This rank joins the process group and takes its own GPU (before anything is loaded onto one)."""
    from accelerate import PartialState

    if not gpu_count():  # accelerate joins CPU processes (gloo) only when told it runs on the CPU
        os.environ["ACCELERATE_USE_CPU"] = "true"
    PartialState(cpu=not gpu_count())


def launch(config, work, rank_main, how: str | None = None) -> None:
    """Train on config.num_gpus processes, each running rank_main(config values, work root) (`how`: "notebook" =
    notebook_launcher, "script" = accelerate launch of `python -m helpers train`; None picks by where we are)."""
    check(config)
    if os.environ.get("KIT_LAUNCHED"):
        raise DistributedError("the launcher started these training processes without a process group (no WORLD_SIZE);"
                               " run `accelerate launch --num_processes N -m helpers train` or set num_gpus=1.")
    values = dataclasses.asdict(config)
    how = how or ("notebook" if _in_notebook() else "script")
    port = _free_port()
    print(f"training on {config.num_gpus} {'GPUs' if gpu_count() else 'CPU processes (gloo)'} with "
          f"{config.distributed}; each takes {_share(config)} of the {config.batch_size * config.gradient_accumulation}"
          " rows per update.")
    if how == "notebook":
        from accelerate import notebook_launcher
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # left by an earlier one-process training here
        os.environ["KIT_LAUNCHED"] = "1"  # the forked ranks inherit it
        try:
            notebook_launcher(rank_main, (values, str(work.root)), num_processes=config.num_gpus, use_port=str(port))
        except RuntimeError as e:
            if "initialized before" in str(e):
                raise DistributedError("CUDA was already started in this kernel, so it cannot start one process per "
                                       "GPU; restart the kernel and run the notebook again from the top.") from None
            raise
        finally:
            del os.environ["KIT_LAUNCHED"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(config.num_gpus),
                   "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--multi_gpu",  # torchrun's ranks; without a GPU they talk over gloo
                   "-m", "helpers", "train", "--work-dir", str(work.root), "--config-json", json.dumps(values)]
        done = subprocess.run(command, env=os.environ | {"PYTHONPATH": _python_path(), "KIT_LAUNCHED": "1"})
        if done.returncode:
            raise DistributedError(f"the {config.num_gpus} training processes failed (exit code {done.returncode}); "
                                   "the lines above name the error of the first one that failed.")


def _share(config) -> str:
    c = per_rank(config, config.num_gpus)
    return f"{c.batch_size} x {c.gradient_accumulation}"


def _python_path() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + rest if rest else "")


# ---------------------------------------------------------------- inside a rank
def trainer_arguments(config) -> dict:
    """TrainingArguments for this rank's strategy (DDP needs none beyond the launch)."""
    if world_size() == 1:
        return {}
    # Every adapter weight is used in every forward; the buffers (rotary frequencies) are the same on every rank.
    args = {"ddp_find_unused_parameters": False, "ddp_broadcast_buffers": False}
    if config.distributed == "zero2":
        args["deepspeed"] = {
            "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_allow_untested_optimizer": True,
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    elif config.distributed == "fsdp":
        # FSDP2: each decoder layer its own shard unit; mixed dtypes (16-bit base, adapters) are allowed per weight.
        args["fsdp"] = "full_shard auto_wrap"
        args["fsdp_config"] = {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
    return args


def token_average_scale(trainer, num_items_in_batch) -> int:
    """The factor the Trainer's own compute_loss applies when tokens are averaged across processes.

    The loss of a rank is (its token sum) / (all ranks' trained tokens), and DDP / ZeRO / FSDP average gradients
    over ranks; multiplying by the number of ranks makes the update the same as one process seeing every row.
    """
    if num_items_in_batch is None or not trainer.args.average_tokens_across_devices:
        return 1
    return trainer.accelerator.num_processes


def unwrap(model):
    """The PeftModel inside DDP / DeepSpeed wrappers (FSDP2 shards the model in place: it is its own inside)."""
    while not hasattr(type(model), "get_base_model") and hasattr(model, "module"):  # the class's, not forwarded
        model = model.module
    return model


@contextlib.contextmanager
def full_weights(model):
    """The whole model on every rank for a moment (FSDP gathers its shards), e.g. to answer the evaluation inputs."""
    if world_size() > 1 and hasattr(model, "unshard") and hasattr(model, "reshard"):  # FSDP2's root
        model.unshard()
        try:
            yield unwrap(model)
        finally:
            model.reshard()
        return
    yield unwrap(model)


def barrier() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def main_first(fn):
    """fn() on the main rank, then its (picklable) result on every rank."""
    if world_size() == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box = [fn() if is_main() else None]
    broadcast_object_list(box, from_process=0)
    return box[0]
