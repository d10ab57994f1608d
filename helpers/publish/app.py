"""The app bundle WORK/publish/app: a deployable Streamlit chat demo that fetches the published model on first start."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from ..base_model import ModelPathError
from ..paths import WEB_APP, Work, staged_dir
from ..results import read_results
from .card import TEMPLATES
from .model_repo import _require_verified, served_system_prompt
from .remote import PublishError, _check_url, _is_local

APP_REQUIREMENTS = ["streamlit", "transformers", "tokenizers", "torch", "safetensors", "accelerate", "sentencepiece"]
# A deployed app never edits its own source, and watching it walks every imported module (slow, noisy).
STREAMLIT_CONFIG = '[server]\nfileWatcherType = "none"\nheadless = true\n\n[browser]\ngatherUsageStats = false\n'
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"  # torch without the CUDA libraries (~0.2 GB, not ~3 GB)
# The install time the app's README gives: tests/test_app_bundle.py measures it (test-artifacts/app_install.json).
APP_INSTALL = TEMPLATES / "app_install.json"


def _pinned(names: list[str], device: str = "cpu") -> list[str]:
    """requirements.txt lines, pinned to this environment's versions; on "cpu" torch is the CPU build from
    PyTorch's index (PyPI's Linux torch brings the CUDA libraries); on "cuda" it is PyPI's (CUDA) build."""
    from importlib.metadata import PackageNotFoundError, version

    lines = [f"--extra-index-url {CPU_TORCH_INDEX}"] if device == "cpu" else []
    for name in names:
        try:
            release = version(name).split("+")[0]  # '2.13.0+cpu' -> the public release
        except PackageNotFoundError:
            continue
        lines.append(f"{name}=={release}+cpu" if name == "torch" and device == "cpu" else f"{name}=={release}")
    return lines


def install_footprint(names: list[str]) -> dict:
    """Disk size of the packages `names` pull in (their dependencies too), as installed in this environment."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen, todo, size = set(), list(names), 0
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        size += sum(f.size or 0 for f in dist.files or [])
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return {"packages": len(seen), "mb": round(size / 2**20)}


def build_app_bundle(work: Work, model_repo_url: str, title: str = "我的小助手", revision: str = "main",
                     device: str = "cpu", allow_unverified: bool = False) -> Path:
    """WORK/publish/app: app.py (fetch the model with git-lfs on first start, then the chat demo), chat_app.py,
    fetch_model.py, app_config.json, requirements.txt, packages.txt and a README with the deploy steps.

    device: "cpu" pins the CPU build of torch (small, quick to install), "cuda" the CUDA build. A local
    (file://) model_repo_url is replaced by the hub remote an earlier run of notebook 06 pushed to, if any."""
    from jinja2 import Template

    from ..parameters import check_value

    check_value("app_title", title, str, error=PublishError)
    check_value("branch", revision, str, error=PublishError)
    if work.final_model.exists():  # the app serves what was published from it
        _require_verified(work.final_model, allow_unverified)
    if not WEB_APP.exists():
        raise PublishError(f"{WEB_APP} is missing; the app bundle copies the chat demo from there.")
    if device not in ("cpu", "cuda"):
        raise PublishError(f"device is {device!r}; use 'cpu' (a CPU app) or 'cuda' (a GPU app).")
    url = _check_url(model_repo_url, "the app's model_repo_url")
    pushed = (read_results(work, "06_publish") or {}).get("remote")
    if _is_local(url) and isinstance(pushed, str) and pushed and not _is_local(pushed):
        print(f"note: the app fetches the model from {pushed}, where it was pushed before ({url} is on this machine only)")
        url = pushed
    try:  # the prompt of the model the app pulls: the built repository's record, else the final model's
        system = served_system_prompt(work, work.model_repo if (work.model_repo / "config.json").exists() else None)
    except ModelPathError as e:
        raise PublishError(str(e)) from None
    with staged_dir(work.app, keep=(".git",)) as tmp:
        shutil.copy2(WEB_APP, tmp / "chat_app.py")
        for name in ("app.py", "fetch_model.py"):
            shutil.copy2(TEMPLATES / name, tmp / name)
        config = {"model_repo_url": url, "revision": revision, "title": title, "system": system}
        (tmp / "app_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (tmp / "requirements.txt").write_text("\n".join(_pinned(APP_REQUIREMENTS, device)) + "\n", encoding="utf-8")
        (tmp / "packages.txt").write_text("git\ngit-lfs\n", encoding="utf-8")
        (tmp / ".gitignore").write_text("model_cache/\n__pycache__/\n", encoding="utf-8")
        (tmp / ".streamlit").mkdir()
        (tmp / ".streamlit" / "config.toml").write_text(STREAMLIT_CONFIG, encoding="utf-8")
        readme = Template((TEMPLATES / "app_README.md").read_text(encoding="utf-8"))
        from importlib.metadata import version

        (tmp / "README.md").write_text(readme.render(title=title, url=url, revision=revision, device=device,
                                                     footprint=install_footprint(APP_REQUIREMENTS),
                                                     install=json.loads(APP_INSTALL.read_text(encoding="utf-8")),
                                                     streamlit_version=version("streamlit"),
                                                     python_version=f"{sys.version_info.major}.{sys.version_info.minor}"),
                                       encoding="utf-8")
    return work.app
