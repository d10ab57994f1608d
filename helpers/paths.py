"""Every path inside the work directory, named in one place (see DESIGN.md)."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no folder locks; a replace running at the same time is not told apart
    fcntl = None

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DATA_DIR = REPO_ROOT / "data"
DEFAULT_WORK_DIR = REPO_ROOT / "work"
WEB_APP = Path(__file__).resolve().parent / "web_app.py"  # the web demo's streamlit page (helpers web, the app bundle)


@dataclass(frozen=True)
class Work:
    """The work directory of one run of the course; notebooks read and write only here."""

    root: Path

    @property
    def model(self) -> Path:  # base model: built tiny model, or a record of the real path
        return self.root / "model"

    @property
    def converted_model(self) -> Path:  # a real checkpoint rewritten to a layout transformers loads natively
        return self.model / "converted"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def dataset(self) -> Path:
        return self.data / "personal_assistant.json"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def checkpoints(self) -> Path:
        return self.train / "checkpoints"

    @property
    def eval_outputs(self) -> Path:
        return self.train / "eval_outputs"

    @property
    def metrics(self) -> Path:
        return self.train / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.train / "loss.png"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def final_model(self) -> Path:
        return self.root / "final_model"

    @property
    def contrast(self) -> Path:  # notebook 04's over-fitted contrast run: a work dir of its own (data, train, adapter)
        return self.root / "contrast"

    @property
    def vlm(self) -> Path:
        return self.root / "vlm"

    @property
    def vlm_data(self) -> Path:
        return self.vlm / "data"

    @property
    def vlm_train(self) -> Path:
        return self.vlm / "train"

    @property
    def vlm_vision(self) -> Path:  # the tiny CLIP vision tower the kit builds (when no real one is given)
        return self.vlm / "vision"

    @property
    def vlm_base_model(self) -> Path:  # LLM + vision tower + a fresh projector, before any training
        return self.vlm / "base_model"

    @property
    def vlm_aligned_model(self) -> Path:  # after stage 1: the projector pre-aligned on captions
        return self.vlm / "aligned_model"

    def vlm_stage(self, stage: int) -> Path:
        """WORK/vlm/train/stage<N>: checkpoints/, eval_outputs/, metrics.jsonl, loss.png of one stage."""
        return self.vlm_train / f"stage{stage}"

    @property
    def vlm_adapter(self) -> Path:
        return self.vlm / "adapter"

    @property
    def vlm_final_model(self) -> Path:
        return self.vlm / "final_model"

    @property
    def publish(self) -> Path:
        return self.root / "publish"

    @property
    def model_repo(self) -> Path:
        return self.publish / "model_repo"

    @property
    def app(self) -> Path:
        return self.publish / "app"

    @property
    def publish_remote(self) -> Path:  # the default push target: a local bare repository (file:// URL)
        return self.publish / "remote.git"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def executed(self) -> Path:
        return self.root / "executed"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def result(self, notebook: str) -> Path:
        """WORK/results/NN_<name>.json for a notebook stem such as '01_data_generation'."""
        return self.results / f"{Path(notebook).stem}.json"


def work(work_dir: str | os.PathLike | None = None, create: bool = True) -> Work:
    """The Work for `work_dir` (default: <repo>/work; a relative path is taken from the current directory)."""
    # COURSE_WORK_DIR overrides the default, read at call time (the test suite points it at a temp dir).
    default = Path(os.environ.get("COURSE_WORK_DIR") or DEFAULT_WORK_DIR)
    root = Path(work_dir).expanduser().resolve() if work_dir else default
    if create:
        root.mkdir(parents=True, exist_ok=True)
    w = Work(root)
    recover_work(w)  # whoever opens the work dir finds its folders whole, even after a kill mid-replace
    return w


# A replace of folder X goes through siblings that only ever hold whole copies, so a kill at any point leaves X or
# one of them whole: .X.tmp* (being built: dropped), .X.new (built: becomes X if X is gone), .X.old (the previous
# X: comes back if X is gone, else dropped), .X.trash* (being deleted). recover_dir settles them.
REPLACE_STEPS = ("built", "kept", "staged", "moved aside", "swapped", "done")
_after_step = None  # a test's hook, called with each step's name: it kills the process there


def _step(name: str) -> None:
    if _after_step is not None:
        _after_step(name)


def _lock(path: Path) -> int | None:
    """An exclusive lock on a folder that lives as long as this process holds it (a kill releases it)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _busy(path: Path) -> bool:
    """Whether a replace still running (in any process) holds `path`."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _discard(path: Path, dest: Path) -> None:
    """Rename first, then delete: a kill in the middle leaves a .X.trash* folder, never a half .X.old."""
    trash = path.with_name(f".{dest.name}.trash-{os.getpid()}-{time.time_ns()}")
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the old copy is deleted right after the swap, so sharing its files is safe
    except OSError:
        shutil.copy2(src, dst)


def recover_dir(dest: str | os.PathLike, keep: tuple[str, ...] = ()) -> Path:
    """Finish or roll back a replace of `dest` that a kill interrupted, and remove its leftovers; returns `dest`.
    Safe to call at any time by anyone who reads `dest`: a replace still running is left alone."""
    dest = Path(dest)
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return dest
    prefix = f".{dest.name}."
    scraps = [dest.parent / n for n in names if n.startswith((prefix + "tmp", prefix + "trash"))]
    new, old = dest.with_name(prefix + "new"), dest.with_name(prefix + "old")
    if not (scraps or new.exists() or old.exists()) or any(_busy(p) for p in (*scraps, new, dest)):
        return dest
    if new.exists():
        if dest.exists():  # killed before the swap began: dest is still the whole previous version
            _discard(new, dest)
        else:  # killed mid-swap: the new version is whole, finish the swap
            new.rename(dest)
    if old.exists():
        if dest.exists():  # killed after the swap: the previous version is not needed any more
            _discard(old, dest)
        else:  # dest is gone and this is the only copy: bring it back
            old.rename(dest)
    for scrap in scraps:
        for name in keep:  # a build killed by an older kit may hold the only copy of a kept name (.git)
            if dest.is_dir() and (scrap / name).exists() and not (dest / name).exists():
                (scrap / name).rename(dest / name)
        shutil.rmtree(scrap, ignore_errors=True)
    return dest


def recover_work(work: Work) -> None:
    """Settle every interrupted replace of a folder of the work directory (model, adapter, final_model, vlm/*,
    publish/*, report, contrast/*)."""
    for parent in (work.root, work.model, work.vlm, work.publish, work.contrast):
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            m = re.match(r"^\.(.+)\.(?:tmp.*|trash-.*|new|old)$", name)
            if m and (parent / name).is_dir():
                recover_dir(parent / m.group(1))


@contextmanager
def staged_dir(dest: str | os.PathLike, keep: tuple[str, ...] = ()):
    """Build a directory beside `dest` and swap it in by rename when the block ends, so no reader ever sees a
    half-written one; if the block fails, `dest` is left as it was, and a kill at any point is settled by the
    next staged_dir or recover_dir on `dest`. `keep`: names carried over from the old `dest` (e.g. ".git", so a
    rebuilt repository keeps its history); they are linked, not moved, so the old `dest` stays whole until the swap."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dest, keep)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp"))
    lock = _lock(tmp)  # follows the folder through its renames: recover_dir leaves a live replace alone
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; what is built here is meant to be read
        yield tmp
        _step("built")
        for name in keep:
            src, dst = dest / name, tmp / name
            if src.exists() and not dst.exists():
                if src.is_dir():
                    shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(str(src), str(dst))
        _step("kept")
        new, old = dest.with_name(f".{dest.name}.new"), dest.with_name(f".{dest.name}.old")
        tmp.rename(new)
        _step("staged")
        if dest.exists():
            dest.rename(old)
        _step("moved aside")
        new.rename(dest)
        _step("swapped")
        if old.exists():
            _discard(old, dest)
        _step("done")
    finally:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(tmp, ignore_errors=True)  # still there only when the block failed
