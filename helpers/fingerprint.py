"""Content hashes: what identifies a model, an adapter or a run is what its files hold, never where they lie."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# Files a folder's hash leaves out: records the kit writes about a folder, and documentation.
NOT_CONTENT = ("course_model.json", "verification.json", "training_record.json", "README.md")
_CHUNK = 1 << 22


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "assistant-course-kit" / "sha256"


def file_sha256(path: str | os.PathLike, cached: bool = True) -> str:
    """sha256 of a file's bytes. `cached`: reuse the hash computed for the same inode, size, mtime and ctime
    (ctime changes on every write and cannot be set back, so an edited file is always hashed again); a check
    that judges a student's files passes cached=False."""
    path = Path(path)
    stat = path.stat()
    key = hashlib.sha1(f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
                       .encode()).hexdigest()  # no path: a folder renamed into place keeps its files' hashes
    entry = _cache_dir() / key
    if cached:
        try:
            known = entry.read_text().strip()
            if len(known) == 64:
                return known
        except OSError:
            pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if cached:  # a cache that cannot be written only costs time
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{key}.{os.getpid()}")
            tmp.write_text(value)
            os.replace(tmp, entry)
        except OSError:
            pass
    return value


def content_files(folder: str | os.PathLike) -> list[Path]:
    """The files that make up a model or adapter folder: every top-level file but hidden ones and the kit's records."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name not in NOT_CONTENT)


def folder_hashes(folder: str | os.PathLike, cached: bool = True) -> dict[str, str]:
    """{file name: sha256} of a folder's content files."""
    return {p.name: file_sha256(p, cached) for p in content_files(folder)}


def combined_sha256(hashes: dict[str, str]) -> str:
    """One hash for a set of named file hashes (order-free)."""
    return hashlib.sha256(json.dumps(sorted(hashes.items())).encode()).hexdigest()


def folder_sha256(folder: str | os.PathLike, cached: bool = True) -> str:
    """One hash of everything a model or adapter folder holds (its content files' names and bytes)."""
    return combined_sha256(folder_hashes(folder, cached))


def parameter_count(folder: str | os.PathLike) -> int:
    """Number of parameters stored in a folder's safetensors files, read from their headers only."""
    import struct

    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total


def model_identity(folder: str | os.PathLike, source: str | None = None, cached: bool = True) -> dict:
    """What a base model is, by content: where it came from (hub id or folder name), its architecture and size,
    and a hash of its config, tokenizer and weight files."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or config
    hashes = folder_hashes(folder, cached)
    return {"source": source or folder.name, "path": str(folder.resolve()),
            "architecture": (config.get("architectures") or [config.get("model_type", "?")])[0],
            "hidden_size": text.get("hidden_size"), "layers": text.get("num_hidden_layers"),
            "vocab_size": text.get("vocab_size"), "parameters": parameter_count(folder),
            "content_sha256": combined_sha256(hashes), "files": hashes}


# The folders whose content a notebook's results may come from, as WORK attributes (see current_sources).
SOURCES = ("adapter", "final_model", "vlm_adapter", "vlm_final_model")


def current_sources(work, names=SOURCES) -> dict:
    """{name: folder_sha256} of WORK's adapter / final_model / vlm folders as they are now (None where absent).
    A notebook saves this as its results' "sources"; the report compares it with the files later (stale_sources)."""
    folders = {name: Path(getattr(work, name)) for name in names}
    return {name: folder_sha256(f) if f.is_dir() and content_files(f) else None for name, f in folders.items()}


def stale_sources(work, recorded: dict) -> list[str]:
    """The names among `recorded` ({name: sha256}, a results' "sources") whose folder no longer holds that content."""
    known = {k: v for k, v in (recorded or {}).items() if k in SOURCES}
    now = current_sources(work, tuple(known))
    return [name for name, sha in known.items() if sha != now[name]]
