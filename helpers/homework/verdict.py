"""What every check shares: its verdict (Check), what the grader found once (Graded), and the sentences for a
missing artifact or a failure."""
from __future__ import annotations

from dataclasses import dataclass

from ..paths import Work


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    reason: str


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _not_run(notebook: str, work: Work | None = None, what: str = "") -> str:
    """Why an artifact is missing: the notebook did not run, or it ran and the artifact is gone since."""
    if work is not None and work.result(notebook).exists():
        return f"{what} is missing although notebook {notebook} ran; run it again"
    return (f"{what} is missing: " if what else "") + f"notebook {notebook} did not run (no results/{notebook}.json)"


@dataclass
class Graded:
    """What the grader found once and several checks use: the identity the dataset teaches, the base to judge on."""

    name: str | None = None
    identity: str | None = None  # the identity answer the adapter was trained on
    base: str | None = None  # the base model folder every model check loads
    base_problem: str = ""  # why no base could be had
    answers: dict | None = None  # question -> answer of base + adapter (identity, paraphrases, general)


def trained_on(work: Work) -> dict:
    """The adapter's training record (what train() wrote beside the adapter), {} when there is none."""
    import json

    try:
        return json.loads((work.adapter / "training_record.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
