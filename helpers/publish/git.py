"""git and git-lfs as subprocesses: the token handed over by a credential helper, failures told in one sentence."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from .remote import TOKEN_ENV, PublishError, _safe_url

class _Git:
    """git with the token handed over by a credential helper that reads it from this process's environment."""

    def __init__(self, repo_dir: Path, token: str | None = None, username: str | None = None):
        self.repo_dir, self.token = Path(repo_dir), token
        self.env = {**os.environ, "LC_ALL": "C", "LANGUAGE": "C", "GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never"}
        if token:
            # Only the variable names go into the (command-line) config: the token never touches a file.
            helper = ('!f() { test "$1" = get && printf "username=%s\\npassword=%s\\n" '
                      '"$COURSE_PUBLISH_USER" "$COURSE_PUBLISH_TOKEN"; }; f')
            n = int(self.env.get("GIT_CONFIG_COUNT", "0") or 0)
            self.env.update({"GIT_CONFIG_COUNT": str(n + 2), f"GIT_CONFIG_KEY_{n}": "credential.helper",
                             f"GIT_CONFIG_VALUE_{n}": "", f"GIT_CONFIG_KEY_{n + 1}": "credential.helper",
                             f"GIT_CONFIG_VALUE_{n + 1}": helper,
                             "COURSE_PUBLISH_USER": username or "user", "COURSE_PUBLISH_TOKEN": token})

    def scrub(self, text: str) -> str:
        return text.replace(self.token, "***") if self.token else text

    def __call__(self, *args, check: bool = True, timeout: float | None = None, input: str | None = None):
        try:
            proc = subprocess.run(["git", *args], cwd=self.repo_dir, env=self.env, capture_output=True, text=True,
                                  timeout=timeout, input=input)
        except subprocess.TimeoutExpired:
            raise PublishError(f"`git {args[0]}` did not finish within {timeout:.0f} s; check the network and run "
                               "the publish step again (it continues where it stopped).") from None
        proc.stdout, proc.stderr = self.scrub(proc.stdout), self.scrub(proc.stderr)
        if check and proc.returncode != 0:
            raise PublishError(f"`git {' '.join(args[:2])}` failed in {self.repo_dir}: {_last_lines(proc.stderr)}")
        return proc


def _git(repo_dir: Path, *args, **kw):
    return _Git(repo_dir)(*args, **kw)


def _last_lines(text: str, n: int = 2) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip() and "%" not in ln]
    return " / ".join(lines[-n:]) or "no message"


def require_git_lfs() -> str:
    """The git-lfs version line, or a PublishError saying how to install it."""
    if shutil.which("git") is None:
        raise PublishError("git is not installed; install it (apt-get install git, or conda install git) and run again.")
    proc = subprocess.run(["git", "lfs", "version"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PublishError("git-lfs is not installed, so the weights cannot be pushed; install it "
                           "(apt-get install git-lfs, or conda install -c conda-forge git-lfs), then run `git lfs install`.")
    return proc.stdout.strip()


def _remote_problem(url: str, stderr: str, token: str | None) -> str:
    """One sentence for a failed fetch/push, from git's own words."""
    low = stderr.lower()
    where = _safe_url(url)
    local = urlsplit(url).scheme == "file"
    if not local and any(s in low for s in ("authentication failed", "401", "403", "invalid username or password",
                              "access denied", "permission denied", "unauthorized", "forbidden")):
        if token:
            return (f"the remote {where} rejected the credentials; check that the token in {TOKEN_ENV} is valid and "
                    "has write access to this repository (and the user name, if the hub needs one).")
        return f"the remote {where} asked for credentials; set {TOKEN_ENV} to an access token with write access."
    if "could not read username" in low or "terminal prompts disabled" in low:
        return f"the remote {where} needs a token; set the {TOKEN_ENV} environment variable (or enter it when asked)."
    if any(s in low for s in ("could not resolve host", "failed to connect", "connection refused", "timed out",
                              "does not appear to be a git repository", "not found", "unable to access",
                              "no such file or directory", "could not read from remote")) or local:
        return (f"cannot reach the remote {where} ({_last_lines(stderr, 1)}); check the URL, that the repository "
                "exists (create it on the hub first), and the network.")
    return f"git could not talk to the remote {where}: {_last_lines(stderr)}"
