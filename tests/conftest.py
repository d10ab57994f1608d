"""Shared fixtures. The whole course runs once per test session (headless, tiny model) and the
tests that need its artifacts read them from `course_work`."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Everything the suite writes, nbval's kernels included, goes to a temporary work dir (not ./work).
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="course-tests-"))
os.environ.setdefault("COURSE_WORK_DIR", str(_SESSION_DIR / "nbval-work"))
os.environ["KIT_HEADLESS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"  # screenshots kept by browser tests


@pytest.fixture(scope="session")
def course_work():
    """A work dir after `python -m helpers run` over every notebook (default parameters)."""
    from helpers.paths import work
    from helpers.runner import run_course

    w = work(_SESSION_DIR / "course")
    assert run_course(w.root, quiet=True) == 0, f"the course run failed; see {w.executed}"
    return w


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The embedded tiny base model, built once per session."""
    from helpers.tiny_model import build_tiny_model

    return build_tiny_model(_SESSION_DIR / "tiny-model")


@pytest.fixture(scope="session")
def artifacts_dir():
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
