"""Every path inside the work directory, named in one place (see DESIGN.md)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DATA_DIR = REPO_ROOT / "data"
DEFAULT_WORK_DIR = REPO_ROOT / "work"


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
    return Work(root)


@contextmanager
def staged_dir(dest: str | os.PathLike, keep: tuple[str, ...] = ()):
    """Build a directory beside `dest` and swap it in by rename when the block ends, so no reader ever sees a
    half-written one; if the block fails, `dest` is left as it was. `keep`: names carried over from the old
    `dest` (e.g. ".git", so a rebuilt repository keeps its history)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; what is built here is meant to be read
    try:
        yield tmp
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
            for name in keep:
                if (old / name).exists():
                    (old / name).rename(tmp / name)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only when the block failed
