"""The model repository WORK/publish/model_repo: the verified final model's files, the card, .gitattributes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..base_model import ModelPathError, check_model_dir
from ..data import file_sha256
from ..paths import Work, staged_dir
from .card import model_card
from .git import _git
from .remote import PublishError, _check_url

# Weights, tokenizer models and images go to LFS: hubs refuse big or binary files in plain git.
LFS_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx",
                "*.model", "tokenizer.json", "*.png", "*.jpg", "*.jpeg"]
MODEL_DIR_SKIP = {".git", ".cache", "course_model.json"}


def gitattributes(patterns: list[str] = LFS_PATTERNS) -> str:
    return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in patterns)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # final_model is replaced by rename, never edited in place, so a hard link is safe
    except OSError:
        shutil.copy2(src, dst)


def served_system_prompt(work: Work, model_dir: str | os.PathLike | None = None) -> str | None:
    """The system prompt the published model was trained with: recorded beside the model (chat_defaults.json),
    else, for the work dir's own final_model, in its adapter's training record; None when nothing records it."""
    from ..chat_defaults import trained_system_prompt

    source = Path(model_dir) if model_dir else work.final_model
    system = trained_system_prompt(source)
    if system is None and source == work.final_model and (work.adapter / "training_record.json").exists():
        system = trained_system_prompt(work.adapter)  # a final_model merged before merge recorded it
    return system


def build_model_repo(work: Work, model_name: str, license: str = "apache-2.0", base_model: str | None = None,
                     repo_url: str | None = None, model_dir: str | os.PathLike | None = None,
                     allow_unverified: bool = False) -> Path:
    """WORK/publish/model_repo: the final model's files, README.md (the card), .gitattributes, the loss plot and
    chat_defaults.json (the system prompt it was trained with, which the chat app starts with).

    The git history of an earlier build is kept, so the next push sends only what changed.
    """
    from ..parameters import check_value

    for name, value, optional in (("model_name", model_name, False), ("license", license, False),
                                  ("base_model_id", base_model, True), ("remote_url", repo_url, True)):
        check_value(name, value, str, optional=optional, error=PublishError)
    if repo_url:
        _check_url(repo_url)
    source = Path(model_dir) if model_dir else work.final_model
    try:
        check_model_dir(source)
    except ModelPathError as e:
        raise PublishError(f"{e} (Publishing needs the merged model: run notebook 03 with this work_dir first.)") from None
    _require_verified(source, allow_unverified, work.adapter if source == work.final_model else None)
    try:
        system = served_system_prompt(work, source)
    except ModelPathError as e:
        raise PublishError(str(e)) from None
    with staged_dir(work.model_repo, keep=(".git",)) as tmp:  # the git history of the last build stays
        for f in sorted(source.rglob("*")):
            rel = f.relative_to(source)
            if f.is_file() and not (set(rel.parts) & MODEL_DIR_SKIP):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(f, tmp / rel)
        if system is not None and not (tmp / "chat_defaults.json").exists():
            from ..chat_defaults import write_chat_defaults

            write_chat_defaults(tmp, system)
        if work.loss_plot.exists():
            shutil.copy2(work.loss_plot, tmp / "loss.png")
        (tmp / ".gitattributes").write_text(gitattributes(), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(work, model_name, license, base_model, repo_url), encoding="utf-8")
    return work.model_repo


def repo_files(repo_dir: Path) -> list[dict]:
    """Every file of the repository (not .git): path, bytes, sha256, and whether git-lfs stores it."""
    repo_dir = Path(repo_dir)
    paths = sorted(str(p.relative_to(repo_dir)) for p in repo_dir.rglob("*")
                   if p.is_file() and ".git" not in p.relative_to(repo_dir).parts)
    lfs = set()
    if paths and (repo_dir / ".git").exists():
        out = _git(repo_dir, "check-attr", "filter", "--stdin", input="\n".join(paths) + "\n").stdout
        lfs = {line.split(": filter: ")[0] for line in out.splitlines() if line.endswith(": filter: lfs")}
    else:
        from fnmatch import fnmatch

        lfs = {p for p in paths if any(fnmatch(Path(p).name, pat) for pat in LFS_PATTERNS)}
    return [{"path": p, "bytes": (repo_dir / p).stat().st_size, "sha256": file_sha256(repo_dir / p), "lfs": p in lfs}
            for p in paths]


def _require_verified(model_dir: Path, allow_unverified: bool, adapter: Path | None = None) -> None:
    """Publish only a merged model whose merge check passed on the files as they are (merge.require_verified); given
    the adapter whose training the card describes, only one merged from it."""
    from ..merge import UnverifiedModelError, require_verified

    try:
        warning = require_verified(model_dir, allow_unverified, adapter)
    except UnverifiedModelError as e:
        raise PublishError(str(e)) from None
    if warning:
        print(warning, flush=True)


def file_table(files: list[dict]):
    """The repository's files as a small DataFrame (path, MB, in LFS, sha256 prefix) for the notebook."""
    import pandas as pd

    return pd.DataFrame([{"path": f["path"], "MB": round(f["bytes"] / 2**20, 3), "lfs": f["lfs"],
                          "sha256": f["sha256"][:12]} for f in files])
