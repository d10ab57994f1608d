"""Fetch the model repository with git + git-lfs into a cache folder, once (standard library only).

Settings come from app_config.json beside this file, overridden by the environment:
MODEL_REPO_URL, MODEL_REVISION, MODEL_CACHE_DIR, MODEL_SYSTEM_PROMPT, and MODEL_REPO_TOKEN (an access token
for a private repository, a deploy platform's secret; MODEL_REPO_USER where the hub needs a user name). The
token is handed to git by a credential helper and never written down; a URL with credentials in it is refused.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

TOKEN_ENV = "MODEL_REPO_TOKEN"
MARKER = ".fetched.json"
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


class FetchError(RuntimeError):
    """The model could not be fetched; the message says why and what to do."""


def settings(app_dir: str | os.PathLike) -> dict:
    """app_config.json beside the app, with MODEL_REPO_URL / MODEL_REVISION / MODEL_CACHE_DIR overriding it."""
    app_dir = Path(app_dir)
    config_file = app_dir / "app_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    url = os.environ.get("MODEL_REPO_URL") or config.get("model_repo_url")
    if not url:
        raise FetchError(f"no model repository configured: set MODEL_REPO_URL or model_repo_url in {config_file}.")
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and ("@" in parts.netloc or parts.query):
        # the URL is shown on the page and written to the cache's marker: a secret in it would be too
        raise FetchError(f"the model repository URL {parts.scheme}://{parts.hostname}{parts.path} has credentials "
                         f"written into it; remove them and set the {TOKEN_ENV} secret instead.")
    return {"model_repo_url": url, "revision": os.environ.get("MODEL_REVISION") or config.get("revision") or "main",
            "cache_dir": os.environ.get("MODEL_CACHE_DIR") or config.get("cache_dir") or str(app_dir / "model_cache"),
            "title": config.get("title"), "system": os.environ.get("MODEL_SYSTEM_PROMPT", config.get("system"))}


def _env(token: str | None) -> dict:
    env = {**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1"}
    if token:
        n = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
        env.update({"GIT_CONFIG_COUNT": str(n + 2), f"GIT_CONFIG_KEY_{n}": "credential.helper", f"GIT_CONFIG_VALUE_{n}": "",
                    f"GIT_CONFIG_KEY_{n + 1}": "credential.helper",
                    f"GIT_CONFIG_VALUE_{n + 1}": ('!f() { test "$1" = get && printf "username=%s\\npassword=%s\\n" '
                                                  f'"${{MODEL_REPO_USER:-user}}" "${TOKEN_ENV}"; }}; f'),
                    TOKEN_ENV: token})
    return env


def _git(args: list[str], cwd: Path, env: dict, what: str, token: str | None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        said = " / ".join(ln.strip() for ln in proc.stderr.splitlines() if ln.strip())[-300:]
        if token:
            said = said.replace(token, "***")
        raise FetchError(f"{what} failed ({said or 'no message'}); check the URL, the revision and, for a private "
                         f"repository, the {TOKEN_ENV} secret.")
    return proc.stdout


def _is_pointer(path: Path) -> bool:
    """Whether a file is still an LFS pointer: its first bytes only (a weight file may be gigabytes)."""
    with open(path, "rb") as f:
        return f.read(len(LFS_POINTER)) == LFS_POINTER


def remote_commit(url: str, revision: str = "main", token: str | None = None) -> str | None:
    """The commit `revision` names on the remote now (git ls-remote); None when the remote cannot be asked."""
    try:
        proc = subprocess.run(["git", "ls-remote", url, revision], env=_env(token), capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    refs = {ref: sha for sha, ref in (line.split("\t", 1) for line in proc.stdout.splitlines() if "\t" in line)}
    if proc.returncode != 0:
        return None
    return refs.get(f"refs/heads/{revision}") or refs.get(f"refs/tags/{revision}") or refs.get(revision)


def fetch_model(url: str, cache_dir: str | os.PathLike, revision: str = "main", token: str | None = None,
                refresh: bool = False, commit: str | None = None) -> Path:
    """CACHE/model holding `revision` of the repository at `url`, weights included; cloned only when missing,
    or when `commit` (the remote's newest, from remote_commit) differs from the one in the cache."""
    cache_dir = Path(cache_dir)
    dest = cache_dir / "model"
    marker = dest / MARKER
    if not refresh and marker.exists():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done.get("url") == url and done.get("revision") == revision and commit in (None, done.get("commit")):
            return dest
    for tool, package in (("git", "git"), ("git-lfs", "git-lfs")):
        if shutil.which(tool) is None:
            raise FetchError(f"{tool} is not installed; list {package} in packages.txt (or apt-get install {package}).")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".model.tmp"))
    env = _env(token)
    try:
        _git(["clone", "-q", "--depth", "1", "--branch", revision, url, str(tmp)], cache_dir, env,
             f"cloning {url} ({revision})", token)
        _git(["lfs", "pull"], tmp, env, f"downloading the LFS files (weights) of {url}", token)
        listed = _git(["lfs", "ls-files", "--name-only"], tmp, env, "listing the LFS files", token).split("\n")
        missing = [p for p in listed if p and _is_pointer(tmp / p)]
        if missing:
            raise FetchError(f"{url}: {missing[0]} is still an LFS pointer after `git lfs pull`; the hub does not "
                             "hold its content (push the weights with git-lfs again).")
        if not (tmp / "config.json").exists():
            raise FetchError(f"{url} ({revision}) has no config.json at its top level, so it is not a model "
                             "repository; set MODEL_REPO_URL to the model's repository.")
        commit = _git(["rev-parse", "HEAD"], tmp, env, "reading the commit", token).strip()
        shutil.rmtree(tmp / ".git")  # its LFS store would double the disk used by the weights
        (tmp / MARKER).write_text(json.dumps({"url": url, "revision": revision, "commit": commit}) + "\n")
        old = cache_dir / ".model.old"
        if old.exists():
            shutil.rmtree(old)
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetched_commit(model_dir: str | os.PathLike) -> str | None:
    marker = Path(model_dir) / MARKER
    return json.loads(marker.read_text(encoding="utf-8")).get("commit") if marker.exists() else None
