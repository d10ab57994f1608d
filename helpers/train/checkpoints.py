"""A run's checkpoints and identity: complete checkpoints (a mark written last), the run's fingerprint by content,
and picking the checkpoint a run resumes from (or clearing an earlier run's files)."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from ..data import atomic_write_text
from ..paths import Work
from .config import TrainConfig, TrainConfigError

CHECKPOINT_MARK = "checkpoint_complete.json"  # written last, listing every file and its size
LOSS_SUM_FILE = "loss_sum.json"  # in each checkpoint: the sum of every update's loss so far (for mean_loss)
RUN_FILE = "run.json"  # the fingerprint of the run the checkpoints belong to


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


def remove_dir(path: Path) -> None:
    """Rename first, then delete: an interrupted delete leaves a hidden dir, never a half checkpoint."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.time_ns()}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def mark_complete(path: Path) -> None:
    files = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    (path / CHECKPOINT_MARK).write_text(json.dumps({"files": files}, indent=1))


EVALUATION_KNOBS = ("evaluation_inputs", "system", "max_new_tokens")  # what the evaluation rounds ask and answer
# Left out of a run's fingerprint: bookkeeping that cannot change the adapter or its answers, and the paths of the
# base model and data (their content is in the fingerprint instead).
NOT_FINGERPRINTED = ("evaluation_freq", "logging_steps", "save_total_limit", "base_model", "data_path")


def run_fingerprint(config: TrainConfig, base_files: dict, data_sha: str) -> dict:
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


def prepare_train_dir(work: Work, config: TrainConfig, fingerprint: dict) -> str | None:
    """Pick the checkpoint to resume from (or None), clearing an earlier run's files when starting over.
    Only a run with the same fingerprint resumes; a new one says what changed."""
    run_file = work.train / RUN_FILE
    ckpts = complete_checkpoints(work.checkpoints)
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    difference = fingerprint_difference(previous, fingerprint)
    if work.checkpoints.exists():  # leftovers of an interrupted write: a checkpoint without its mark, a trash dir
        for p in work.checkpoints.iterdir():
            if p.name.startswith((".staging-", ".trash-")) or (_step_of(p) >= 0 and p not in ckpts):
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
                remove_dir(p)
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


def finished_step(checkpoint: str | None) -> int | None:
    """The checkpoint's step when it is the last step of its run, else None."""
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state["global_step"] if state["global_step"] >= state["max_steps"] > 0 else None


def loss_sum_of(checkpoint: str | None) -> float:
    """The loss summed over the updates before `checkpoint` (0 for a new run)."""
    if checkpoint is None or not (Path(checkpoint) / LOSS_SUM_FILE).exists():
        return 0.0
    return float(json.loads((Path(checkpoint) / LOSS_SUM_FILE).read_text())["loss_sum"])
