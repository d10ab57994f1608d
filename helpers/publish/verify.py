"""Checking a push: the remote cloned back and hashed against the repository, and no weight kept as a plain git blob."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from ..data import file_sha256
from .git import _Git, _git, _remote_problem
from .model_repo import repo_files
from .remote import PublishError, _check_url, _safe_url, _username

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
POINTER_MAX_BYTES = 1024  # the git-lfs spec: a pointer file is smaller than this


def lfs_files(repo_dir: str | os.PathLike) -> list[dict]:
    """Files git-lfs stores for HEAD: oid and path (`git lfs ls-files --long`)."""
    out = _git(Path(repo_dir), "lfs", "ls-files", "--long").stdout
    return [{"oid": m[0], "path": m[1]} for m in re.findall(r"^(\w{64}) [*-] (.+)$", out, re.M)]


def history_pointer_check(repo_dir: str | os.PathLike, patterns=("*.safetensors", "*.bin")) -> list[str]:
    """Paths matching `patterns` that some commit stores as a plain git blob instead of an LFS pointer.

    Only what is needed is read: `git ls-tree -l` gives each blob's size, a blob of POINTER_MAX_BYTES or more is
    plain by its size alone, and each smaller blob is read once (a 3.8 GB weight blob is never read)."""
    from fnmatch import fnmatch

    git = _Git(Path(repo_dir))
    found, is_pointer = [], {}
    for commit in git("rev-list", "--all").stdout.split():
        for line in git("ls-tree", "-r", "-l", commit).stdout.splitlines():
            meta, path = line.split("\t", 1)
            _, kind, sha, size = meta.split()
            if kind == "blob" and any(fnmatch(Path(path).name, p) for p in patterns):
                found.append((f"{commit[:12]}:{path}", sha))
                if int(size) >= POINTER_MAX_BYTES:
                    is_pointer[sha] = False
                elif sha not in is_pointer:
                    blob = subprocess.run(["git", "cat-file", "blob", sha], cwd=repo_dir, capture_output=True).stdout
                    is_pointer[sha] = blob.startswith(LFS_POINTER)
    return [where for where, sha in found if not is_pointer[sha]]


def verify_push(repo_dir: str | os.PathLike, remote_url: str, token: str | None = None, branch: str = "main") -> dict:
    """Clone the remote back, its LFS objects (the weights) included, and compare every file with `repo_dir`, byte
    for byte (by SHA-256): the clone's plain files as checked out, and each LFS file as the object the remote sent
    (`git lfs fetch`), hashed here. The checkout's copy of each object into the working tree is left out: it copies
    bytes already hashed, and for a 3.8 GB model it was 34 of the 49 s the clone-back took."""
    repo_dir, remote_url = Path(repo_dir), _check_url(remote_url)
    with tempfile.TemporaryDirectory(prefix="publish-verify-") as tmp:
        clone = Path(tmp) / "clone"
        git = _Git(Path(tmp), token, _username(remote_url, None))
        git.env["GIT_LFS_SKIP_SMUDGE"] = "1"  # pointers in the working tree; the objects come with `git lfs fetch`
        cloned = git("clone", "-q", "--branch", branch, remote_url, str(clone), check=False)
        if cloned.returncode != 0:
            raise PublishError(_remote_problem(remote_url, cloned.stderr, token))
        git.repo_dir = clone
        fetched = git("lfs", "fetch", "origin", branch, check=False)
        if fetched.returncode != 0 and "invalid hash" in fetched.stderr:  # git-lfs hashes what it downloads
            bad = re.search(r"expected (\w{64})", fetched.stderr)
            raise PublishError(f"the remote {_safe_url(remote_url)} holds an LFS object whose bytes do not match its "
                               f"hash{f' ({bad.group(1)[:12]})' if bad else ''}: the weights there are not what was "
                               "pushed; delete that object (or the repository) on the remote and push again.")
        if fetched.returncode != 0:
            raise PublishError("downloading the LFS objects back failed: " + _remote_problem(remote_url, fetched.stderr, token))
        stored = {f["path"]: f["oid"] for f in lfs_files(clone)}
        theirs = {f["path"]: f["sha256"] for f in repo_files(clone)}  # the LFS files are pointers here: small
        for rel, oid in stored.items():
            obj = clone / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            theirs[rel] = file_sha256(obj) if obj.is_file() else "missing from the remote's LFS store"
        mine = {f["path"]: f["sha256"] for f in repo_files(repo_dir)}
        return {"files": len(theirs), "identical": mine == theirs,
                "differ": sorted(p for p in mine.keys() | theirs.keys() if mine.get(p) != theirs.get(p)),
                "lfs_files": sorted(stored), "plain_weight_blobs": history_pointer_check(clone)}
