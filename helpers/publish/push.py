"""The push: commit the folder, build on a hub's fresh repository, send the LFS objects and then git, read back."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..paths import Work, staged_dir
from .git import _Git, _remote_problem, require_git_lfs
from .remote import PublishError, _check_url, _safe_url, _username

# What a hub puts in a freshly created repository; a first push builds on it instead of refusing.
HUB_SCAFFOLD = {".gitattributes", "README.md", ".gitignore"}


@dataclass
class PushResult:
    """What a push did: where, which commit, and what was sent (the token is never part of it)."""

    remote: str
    branch: str
    commit: str
    pushed: bool = False
    up_to_date: bool = False
    commits_sent: int = 0
    git_objects_sent: int = 0
    lfs_objects_sent: list[dict] = field(default_factory=list)
    merged_hub_scaffold: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def default_remote(work: Work) -> str:
    """A local bare repository WORK/publish/remote.git as a file:// URL (created when missing): the offline target."""
    bare = work.publish_remote
    if not (bare / "HEAD").exists() and shutil.which("git"):  # without git the push says what to install
        with staged_dir(bare) as tmp:
            subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(tmp)], check=True, capture_output=True)
    return bare.resolve().as_uri()


def _commit_all(git: _Git, message: str, author: str) -> bool:
    git("add", "-A")
    has_head = git("rev-parse", "--verify", "-q", "HEAD", check=False).returncode == 0
    if has_head and git("diff", "--cached", "--quiet", check=False).returncode == 0:
        return False
    ident = []
    if not git("config", "user.email", check=False).stdout.strip():
        ident = ["-c", f"user.name={author}", "-c", "user.email=course-kit@users.noreply.localhost"]
    git(*ident, "commit", "-q", "-m", message)
    return True


def _reconcile_history(git: _Git, url: str, branch: str, author: str) -> bool:
    """Make HEAD a descendant of the remote branch, or refuse. True when a hub's initial commit was merged."""
    remote_ref = f"refs/remotes/origin/{branch}"
    if git("rev-parse", "--verify", "-q", remote_ref, check=False).returncode != 0:
        return False  # empty remote, or a new branch
    if git("merge-base", "--is-ancestor", remote_ref, "HEAD", check=False).returncode == 0:
        return False
    where = _safe_url(url)
    if git("merge-base", remote_ref, "HEAD", check=False).returncode == 0:
        raise PublishError(f"the remote {where} has commits on '{branch}' that this repository lacks (pushed from "
                           "elsewhere or edited on the website); pull them into the model repo first, or push to a new repository.")
    files = set(git("ls-tree", "-r", "--name-only", remote_ref).stdout.split())
    if not files <= HUB_SCAFFOLD:
        shown = ", ".join(sorted(files - HUB_SCAFFOLD)[:3])
        raise PublishError(f"the remote {where} already holds an unrelated history on '{branch}' (files such as "
                           f"{shown}); push to a new, empty repository or pick another branch.")
    # A hub's fresh repository (README/.gitattributes only): build on it, keeping our files.
    ident = [] if git("config", "user.email", check=False).stdout.strip() else [
        "-c", f"user.name={author}", "-c", "user.email=course-kit@users.noreply.localhost"]
    git(*ident, "merge", "-q", "-s", "ours", "--allow-unrelated-histories", "--no-edit",
        "-m", "Build on the hub's initial commit", remote_ref)
    return True


def push_folder(repo_dir: str | os.PathLike, remote_url: str, token: str | None = None, username: str | None = None,
                branch: str = "main", message: str = "Publish the fine-tuned model", author: str = "course student",
                timeout: float = 6 * 3600) -> PushResult:
    """Commit everything in `repo_dir` and push it, LFS objects first, to `remote_url`.

    Only what the remote lacks is sent; an interrupted push is finished by running this again. The result is
    returned only after the remote's branch was read back and equals the pushed commit.
    """
    from ..parameters import check_value

    repo_dir = Path(repo_dir)
    url = _check_url(remote_url, "the remote URL")
    check_value("branch", branch, str, error=PublishError)
    require_git_lfs()
    if not repo_dir.is_dir():
        raise PublishError(f"{repo_dir}: no such folder; build the model repository first (build_model_repo).")
    git = _Git(repo_dir, token, _username(url, username))
    if not (repo_dir / ".git").exists():
        git("init", "-q", "-b", branch)
    if not (repo_dir / ".git" / "hooks" / "pre-push").exists():
        git("lfs", "install", "--local")
    _commit_all(git, message, author)
    if git("remote", "get-url", "origin", check=False).returncode == 0:
        git("remote", "set-url", "origin", url)
    else:
        git("remote", "add", "origin", url)
    fetched = git("fetch", "-q", "--prune", "--no-tags", "origin", check=False, timeout=timeout)
    if fetched.returncode != 0:
        raise PublishError(_remote_problem(url, fetched.stderr, token))
    merged = _reconcile_history(git, url, branch, author)
    result = PushResult(remote=_safe_url(url), branch=branch, commit=git("rev-parse", "HEAD").stdout.strip(),
                        merged_hub_scaffold=merged)
    remote_ref = f"refs/remotes/origin/{branch}"
    has_remote = git("rev-parse", "--verify", "-q", remote_ref, check=False).returncode == 0
    result.commits_sent = int(git("rev-list", "--count", f"{remote_ref}..HEAD" if has_remote else "HEAD").stdout)
    dry = git("lfs", "push", "--dry-run", "origin", "HEAD").stdout
    result.lfs_objects_sent = [{"oid": m[0], "path": m[1]} for m in re.findall(r"^push (\w+) => (.+)$", dry, re.M)]
    lfs = git("lfs", "push", "origin", "HEAD", check=False, timeout=timeout)
    if lfs.returncode != 0:
        raise PublishError("uploading the LFS objects (the weights) failed, nothing was published: "
                           + _remote_problem(url, lfs.stderr, token))
    pushed = git("push", "--progress", "--porcelain", "origin", f"HEAD:refs/heads/{branch}", check=False, timeout=timeout)
    if pushed.returncode != 0:
        rejected = re.search(r"\[remote rejected\][^\n]*|\[rejected\][^\n]*", pushed.stdout + pushed.stderr)
        if rejected:
            raise PublishError(f"the remote {result.remote} refused the push ({rejected.group(0).strip()}); the weights "
                               "already uploaded are kept there, so fix the cause and run the publish step again.")
        raise PublishError(_remote_problem(url, pushed.stderr, token))
    total = re.search(r"Total (\d+)", pushed.stderr)
    result.git_objects_sent = int(total.group(1)) if total else 0
    result.up_to_date = "[up to date]" in pushed.stdout or result.commits_sent == 0
    head = git("ls-remote", "origin", f"refs/heads/{branch}", timeout=timeout).stdout.split()
    if not head or head[0] != result.commit:
        raise PublishError(f"the push to {result.remote} reported success but its '{branch}' is "
                           f"{head[0][:12] if head else 'missing'}, not {result.commit[:12]}; run the publish step again.")
    result.pushed = True
    return result


def push_model_repo(work: Work, remote_url: str, token: str | None = None, **kw) -> PushResult:
    """Push WORK/publish/model_repo (see push_folder)."""
    if not (work.model_repo / "README.md").exists():
        raise PublishError(f"{work.model_repo}: not built yet; run build_model_repo (notebook 06) first.")
    return push_folder(work.model_repo, remote_url, token, **kw)
