"""Nothing lost when a run is killed: every replace-a-folder step (staged_dir) survives a SIGKILL between any two
of its steps, and real runs of notebook 03's merge, 05's merge and 06's repository build killed at random moments
finish on the next run; metrics.jsonl survives a torn last line."""
from __future__ import annotations

import json
import os
import random
import select
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


# ---------------------------------------------------------------- append-only logs: a torn last line
def test_a_resume_skips_a_torn_last_line_of_the_metrics_and_says_so(tiny_model_dir, tmp_path, capsys):
    from helpers.data import make_dataset
    from helpers.train import TrainConfig, read_metrics, train

    w = make_work(tmp_path / "w")
    make_dataset(w.dataset, repeats=40, general_ratio=0.2)
    kw = dict(base_model=str(tiny_model_dir), max_steps=8, save_steps=4, evaluation_freq=100, max_new_tokens=4,
              max_length=96, logging_steps=1, seed=3)
    train(TrainConfig(**kw), w)
    # As a kill at step 6 leaves it: checkpoint-4, and metrics up to a row cut off mid-write.
    shutil.rmtree(w.checkpoints / "checkpoint-8")
    rows = [line for line in w.metrics.read_text().splitlines() if json.loads(line)["step"] <= 5]
    w.metrics.write_text("\n".join(rows) + '\n{"step": 6, "loss": 0.81, "l')
    capsys.readouterr()

    result = train(TrainConfig(**kw), w)  # resume="auto"
    out = capsys.readouterr().out
    assert result["resumed_from"].endswith("checkpoint-4") and result["steps"] == 8
    assert out.count("is not a whole row") == 1
    assert f"note: {w.metrics}: the last line is not a whole row (a run stopped while writing it); it is skipped." in out
    assert [r["step"] for r in read_metrics(w)] == list(range(1, 9))
    assert all(line.endswith("}") for line in w.metrics.read_text().splitlines())


def test_a_line_the_disk_cannot_take_whole_is_not_left_half_written(tmp_path, monkeypatch):
    import helpers.train.results as train_module

    log = tmp_path / "metrics.jsonl"
    train_module.append_line(log, json.dumps({"step": 1, "loss": 1.0}))
    real_write = os.write
    with monkeypatch.context() as m:  # a full disk: the write takes only the first bytes
        m.setattr(train_module.os, "write", lambda fd, data: real_write(fd, data[:7]))
        with pytest.raises(OSError, match="took only part of a line"):
            train_module.append_line(log, json.dumps({"step": 2, "loss": 0.5}))
    train_module.append_line(log, json.dumps({"step": 2, "loss": 0.5}))
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'


# ---------------------------------------------------------------- real runs, SIGKILLed at random moments
# Each kill lands at a moment drawn from its seed over the time the operation takes (measured on its own first run).
KILL_SEEDS = (0, 1, 2)
OPERATIONS = {  # what notebooks 03, 05 and 06 run, called through the helpers
    "03 merge": "from helpers.base_model import base_model_path\n"
                "from helpers.merge import merge\n"
                "run = lambda w: merge(base_model_path(w), w.adapter, w.final_model, overwrite=True)",
    "05 merge": "from helpers.vlm_train import merge_vlm\n"
                "run = merge_vlm",
    "06 repository build": "from helpers.publish import build_model_repo\n"
                           "run = lambda w: build_model_repo(w, 'xiaoming-assistant')",
}
KILLED_RUN = """
import sys, time
from helpers.paths import work
{operation}
w = work(sys.argv[1])
print("ready", flush=True)
run(w)
print("done", flush=True)
"""


def _hashes(folder: Path) -> dict:
    from helpers.data import file_sha256

    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(folder).parts}


def _git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def _kill_at(script: str, root: Path, delay: float) -> None:
    """Start the operation in its own process and SIGKILL it `delay` seconds after it is ready."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([proc.stdout], [], [], 300)[0], "the operation's process did not start in 300 s"
        assert proc.stdout.readline().strip() == "ready", "the operation's process did not start"
        time.sleep(delay)
    finally:
        proc.kill()
        proc.wait(timeout=60)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_run_killed_at_a_random_moment_completes_when_run_again(course_work, tmp_path, operation):
    from helpers.base_model import check_model_dir
    from helpers.publish import default_remote, push_model_repo

    namespace = {}
    exec(OPERATIONS[operation], namespace)
    w = make_work(tmp_path / "w")
    shutil.rmtree(w.root)
    shutil.copytree(course_work.root, w.root, symlinks=True)
    target = {"03 merge": w.final_model, "05 merge": w.vlm_final_model, "06 repository build": w.model_repo}[operation]
    history = _git(w.model_repo, "rev-parse", "HEAD")
    started = time.perf_counter()
    namespace["run"](make_work(w.root))
    seconds = time.perf_counter() - started
    expected = _hashes(target)
    script = KILLED_RUN.format(operation=OPERATIONS[operation])
    for seed in KILL_SEEDS:
        _kill_at(script, w.root, random.Random(seed).uniform(0, seconds))
        namespace["run"](make_work(w.root))  # running it again
        assert _leftovers(target.parent, target.name) == [], seed
        assert _hashes(target) == expected, seed  # the same result as an uninterrupted run
        if operation != "06 repository build":
            check_model_dir(target)
    # The model repository kept its history through every kill: the next push builds on it.
    assert _git(w.model_repo, "merge-base", "--is-ancestor", history, "HEAD") == ""
    pushed = push_model_repo(w, default_remote(w))
    assert _git(w.model_repo, "merge-base", "--is-ancestor", history, pushed.commit) == ""
