"""What this machine can do: versions, CPU/GPU, whether 4-bit QLoRA runs here, and the preset that fits."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil


def _version(package: str) -> str:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "not installed"


def can_run_4bit() -> tuple[bool, str]:
    """True when CUDA and bitsandbytes are both there (NF4 QLoRA needs both)."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU: training uses 16/32-bit LoRA instead of 4-bit"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # a broken install raises more than ImportError
        return False, f"bitsandbytes is not usable ({type(e).__name__}); pip install bitsandbytes"
    return True, "CUDA and bitsandbytes found: 4-bit NF4 QLoRA runs here"


def environment(work_dir) -> dict:
    """The facts notebook 00 shows and saves."""
    import torch

    gpu = torch.cuda.is_available()
    ok4, why4 = can_run_4bit()
    facts = {
        "python": platform.python_version(),
        **{pkg: _version(pkg) for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")},
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores",
        "gpu": torch.cuda.get_device_name(0) if gpu else "none",
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else 0.0,
        "bf16": bool(gpu and torch.cuda.is_bf16_supported()),
        "qlora_4bit": ok4,
        "qlora_4bit_note": why4,
        "free_disk_gib": round(shutil.disk_usage(work_dir).free / 2**30, 1),
    }
    facts["recommended_preset"], facts["recommendation"] = recommend_preset(facts)
    facts["training_plan"] = course_plan(facts["recommended_preset"], work_dir)
    return facts


def course_plan(preset: str, work_dir) -> dict:
    """How notebook 02 would train `preset` on this machine (the same make_plan, without loading a model): the
    base model's config.json when notebook 00 has prepared it, else internlm2-chat-1.8b's dimensions."""
    from pathlib import Path

    from .train import TrainConfig
    from .train.plan import make_plan

    model_config = None
    if (Path(work_dir) / "model" / "config.json").exists():
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(str(Path(work_dir) / "model"))
    plan = make_plan(TrainConfig(preset=preset).resolved(), model_config)
    why = dict(plan.why)
    return {choice: f"{value}: {why[choice]}" if why.get(choice) else value for choice, value in plan.rows()}


def recommend_preset(facts: dict) -> tuple[str, str]:
    """The preset that fits: the tiny model on a CPU, the course's homework settings on a GPU."""
    if facts["gpu"] == "none":
        return "tiny", "CPU only: run the course on the embedded tiny model (minutes); a real 1.8B model needs a GPU."
    if not facts["qlora_4bit"]:
        return "homework", "GPU without bitsandbytes: the homework preset trains 16-bit LoRA; install bitsandbytes for 4-bit."
    if facts["gpu_memory_gib"] < 8:
        return "homework", "Small GPU: the homework preset in 4-bit fits a 1.8B model; keep batch_size at 1."
    return "homework", "GPU with 4-bit QLoRA: the homework preset (internlm2-chat-1.8b or Qwen2.5) runs as the course does."


def readable_table(table):
    """A table that shows every value whole and wraps it (a plain DataFrame cuts text past 50 characters mid-word)."""
    return table.style.set_properties(**{"white-space": "pre-wrap", "text-align": "left", "vertical-align": "top"}) \
        .set_table_styles([{"selector": "th", "props": [("text-align", "left"), ("vertical-align", "top")]}])


def environment_table(facts: dict):
    """One row per fact; a group of facts (training_plan) gets a row per item, not a Python dict in one cell."""
    import pandas as pd

    rows = {}
    for key, value in facts.items():
        if isinstance(value, dict):
            rows.update({f"{key}: {item}": str(v) for item, v in value.items()})
        elif key != "preflight":  # a table of its own (preflight_table)
            rows[key] = str(value)
    return readable_table(pd.DataFrame({"value": rows})).set_properties(**{"max-width": "60em"})


def preflight() -> list[dict]:
    """What the later notebooks need from this machine beyond Python packages: a row per check, ✓ or ✗,
    the fix for a ✗ and the notebooks it affects (`make run` / `make test` install the system parts)."""
    import subprocess

    from .plots import cjk_font_name
    from .system_setup import install_hint

    def git_lfs() -> str | None:
        try:
            out = subprocess.run(["git", "lfs", "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.split(" (")[0].strip() if out.returncode == 0 else None

    font = cjk_font_name()
    browser = all(os.path.exists(p) for p in ("/usr/bin/chromium", "/usr/bin/chromedriver"))
    ok4, why4 = can_run_4bit()
    streamlit = _version("streamlit")
    checks = [
        ("git", shutil.which("git") is not None, "git found" if shutil.which("git") else "not found",
         install_hint(["git"]), "06 (publish)"),
        ("git-lfs", git_lfs() is not None, git_lfs() or "not found",
         f"{install_hint(['git-lfs'])}, then git lfs install", "06 (the push; the app bundle is built without it)"),
        ("CJK font for matplotlib", font is not None, font or "none: Chinese in plots shows as boxes",
         install_hint(["a CJK font"]), "02 (loss plot), the report"),
        ("streamlit", streamlit != "not installed", streamlit, "pip install streamlit", "04 (web demo), 06 (app)"),
        ("browser for the web test", browser, "chromium + chromedriver" if browser else "not found",
         install_hint(["chromium + chromedriver"]), "the tests of the web demo and app (make test)"),
        ("GPU / 4-bit QLoRA", ok4, why4, "a CUDA GPU and pip install -e .[gpu]",
         "02 and 05 with a real model (the tiny course runs without)"),
    ]
    return [{"check": name, "status": "✓" if ok else "✗", "found": found, "fix": "" if ok else fix,
             "affects": "" if ok else affects} for name, ok, found, fix, affects in checks]


def preflight_table(rows: list[dict]):
    import pandas as pd

    table = pd.DataFrame(rows).set_index("check")
    return readable_table(table).set_properties(subset=["found", "fix", "affects"], **{"max-width": "22em"})
