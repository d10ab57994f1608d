"""Nothing lost when a run is killed: every replace-a-folder step (staged_dir) survives a SIGKILL between any two
of its steps, and real runs of notebook 03's merge, 05's merge and 06's repository build killed at random moments
finish on the next run; metrics.jsonl survives a torn last line."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers.paths import REPLACE_STEPS, recover_dir, staged_dir, work as make_work

REPO = Path(__file__).resolve().parent.parent


def _python(script: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kw)


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the mechanism, killed between each pair of steps
REBUILD = """
    import os, signal, sys
    from pathlib import Path
    from helpers import paths

    dest, step = Path(sys.argv[1]), sys.argv[2]
    paths._after_step = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == step else None
    with paths.staged_dir(dest, keep=(".git",)) as tmp:
        (tmp / "weights").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "card").write_text("new card")
        if step == "building":
            os.kill(os.getpid(), signal.SIGKILL)
"""


def _first_build(dest: Path) -> None:
    with staged_dir(dest) as tmp:
        (tmp / "weights").write_text("old")
        (tmp / "stale").write_text("only in the old build")
        (tmp / ".git").mkdir()
        (tmp / ".git" / "HEAD").write_text("ref: refs/heads/main")
        (tmp / ".git" / "objects").mkdir()
        (tmp / ".git" / "objects" / "abc").write_text("history")


OLD = {"weights": "old", "stale": "only in the old build", ".git/HEAD": "ref: refs/heads/main",
       ".git/objects/abc": "history"}
NEW = {"weights": "new", "sub/card": "new card", ".git/HEAD": "ref: refs/heads/main", ".git/objects/abc": "history"}


@pytest.mark.parametrize("step", ("building",) + REPLACE_STEPS)
def test_a_replace_killed_after_any_step_is_settled_by_the_next_reader(tmp_path, step):
    dest = tmp_path / "model_repo"
    _first_build(dest)
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(REBUILD), str(dest), step], cwd=REPO, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    # Whatever the kill left, the folder or a whole copy of it is on disk: the old build or the new one.
    recover_dir(dest)
    assert _leftovers(tmp_path, "model_repo") == []
    got = _tree(dest)
    # Killed before the old build was set aside, it stays; once it was, the swap is finished.
    assert got == (OLD if step in ("building", "built", "kept", "staged") else NEW), step
    # A rebuild after the kill keeps the history.
    with staged_dir(dest, keep=(".git",)) as tmp:
        (tmp / "weights").write_text("third")
    assert _tree(dest) == {"weights": "third", ".git/HEAD": "ref: refs/heads/main", ".git/objects/abc": "history"}
    assert _leftovers(tmp_path, "model_repo") == []


def test_opening_the_work_dir_settles_every_interrupted_replace(tmp_path):
    w = make_work(tmp_path / "w")
    for dest in (w.final_model, w.model_repo, w.vlm_final_model, w.adapter):
        _first_build(dest)
        killed = subprocess.run([sys.executable, "-c", textwrap.dedent(REBUILD), str(dest), "moved aside"], cwd=REPO,
                                timeout=120)
        assert killed.returncode == -signal.SIGKILL and not dest.exists()
    make_work(w.root)  # what every notebook and command does first
    for dest in (w.final_model, w.model_repo, w.vlm_final_model, w.adapter):
        assert _tree(dest) == NEW and _leftovers(dest.parent, dest.name) == []


def test_the_old_kits_interrupted_swap_gets_its_history_back(tmp_path):
    """What the kit before this change left when killed mid-swap: model_repo renamed to .model_repo.old, .git
    already moved into the new build. The next build used to delete .model_repo.old: the only copy."""
    dest = tmp_path / "model_repo"
    _first_build(dest)
    dest.rename(tmp_path / ".model_repo.old")
    with staged_dir(dest, keep=(".git",)) as tmp:
        (tmp / "weights").write_text("rebuilt")
    assert _tree(dest) == {"weights": "rebuilt", ".git/HEAD": "ref: refs/heads/main", ".git/objects/abc": "history"}

    _first_build(dest)
    half = tmp_path / ".model_repo.tmpabc123"
    half.mkdir()
    (dest / ".git").rename(half / ".git")
    dest.rename(tmp_path / ".model_repo.old")
    with staged_dir(dest, keep=(".git",)) as tmp:
        (tmp / "weights").write_text("rebuilt")
    assert (dest / ".git" / "objects" / "abc").read_text() == "history"
    assert _leftovers(tmp_path, "model_repo") == []


def test_a_replace_still_running_is_left_alone(tmp_path):
    dest = tmp_path / "final_model"
    _first_build(dest)
    with staged_dir(dest) as tmp:
        (tmp / "weights").write_text("new")
        # Someone opens the work dir meanwhile (another process's reader): the build in progress must survive.
        got = _python(f"from helpers.paths import recover_dir; recover_dir({str(dest)!r})", timeout=120)
        assert got.returncode == 0, got.stderr
        assert tmp.exists()
    assert _tree(dest) == {"weights": "new"}
