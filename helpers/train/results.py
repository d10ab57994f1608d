"""Reading a run's results: metrics, evaluation rounds, the adapter; the append-only log's two halves."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from ..paths import Work


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


def peak_memory_mb() -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident memory (CPU), in MiB."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loss_plot_png(rows: list[dict], title: str = "training loss") -> bytes | None:
    """The loss curve (and learning rate) as PNG bytes."""
    if not rows:
        return None
    import io

    from matplotlib.figure import Figure

    from ..plots import use_cjk_font

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
