"""Reading the work directory for the report: the notebooks' names, evaluation rounds, the loss log, the VLM picture."""
from __future__ import annotations

import json
from pathlib import Path

from ..paths import Work

NOTEBOOKS = {
    "00": "00_environment", "01": "01_data_generation", "02": "02_qlora_finetune", "03": "03_merge",
    "04": "04_chat_demo", "05": "05_vlm_llava_finetune", "06": "06_publish",
}


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def _scalars(d: dict, skip=()) -> list[tuple[str, str]]:
    return [(k, _text(v)) for k, v in d.items()
            if k not in skip and not k.startswith("_") and (isinstance(v, (str, int, float, bool)) or v is None)]


def _find_push(r: dict) -> dict:
    """The push record of notebook 06, top level or nested (it names a commit)."""
    if "commit" in r or "pushed_commit" in r:
        return r
    return next((v for v in r.values() if isinstance(v, dict) and ("commit" in v or "pushed_commit" in v)), {})


def evaluation_rounds(work: Work) -> list[dict]:
    rounds = []
    for p in sorted(work.eval_outputs.glob("step_*.json")) if work.eval_outputs.exists() else []:
        try:
            r = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and isinstance(r.get("answers"), list):
            rounds.append(r)
    return sorted(rounds, key=lambda r: r.get("step", 0))


def loss_points(work: Work) -> list[tuple[int, float]]:
    points = []
    if work.metrics.exists():
        for line in work.metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)):
                points.append((row.get("step", len(points)), float(row["loss"])))
    return points


def vlm_image(work: Work, r: dict) -> Path | None:
    for key in ("image", "image_path", "picture"):
        v = r.get(key)
        if isinstance(v, str) and Path(v).is_file():
            return Path(v)
    if isinstance(r.get("images"), list) and r["images"] and Path(str(r["images"][0])).is_file():
        return Path(str(r["images"][0]))
    found = sorted(p for ext in ("png", "jpg", "jpeg") for p in work.vlm_data.glob(f"*.{ext}")) if work.vlm_data.exists() else []
    return found[0] if found else None


def metrics_table(rows: list[dict]):
    """WORK/train/metrics.jsonl as a person reads it (a DataFrame by step): seconds since the first logged step rather
    than a Unix timestamp, and the share of one pass over the data read so far rather than a bare 'epoch'."""
    import pandas as pd

    table = pd.DataFrame(rows)
    if table.empty:
        return table
    if "time" in table:
        table["time"] = (table["time"] - table["time"].iloc[0]).round(1)
    names = {"time": "seconds since the first log", "epoch": "passes over the data", "tokens_per_s": "tokens/s",
             "peak_memory_mb": "peak memory (MB)", "grad_norm": "gradient norm", "lr": "learning rate"}
    return table.rename(columns=names).set_index("step")
