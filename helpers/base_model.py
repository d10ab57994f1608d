"""Choosing the base model: the embedded tiny one, a local Hugging Face model directory, or a hub id."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .fingerprint import model_identity
from .paths import Work
from .tiny_model import RECORD_FILE, build_tiny_model

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ModelPathError(ValueError):
    """A model path that is missing or is not a model; the message says what to fix."""


def check_model_dir(path: str | os.PathLike, need_tokenizer: bool = True) -> Path:
    """Check that `path` holds a Hugging Face model: config.json, weights and (optionally) tokenizer files."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelPathError(f"{path}: no such directory; give the folder that holds config.json and the weights.")
    if not path.is_dir():
        raise ModelPathError(f"{path}: is a file, not a model directory; give the folder that holds config.json.")
    if not (path / "config.json").exists():
        raise ModelPathError(f"{path}: has no config.json, so it is not a Hugging Face model directory; "
                             "point to the folder that save_pretrained wrote (or the downloaded model).")
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ModelPathError(f"{path}: has config.json but no weights (*.safetensors or *.bin); "
                             "finish the download (git lfs pull) or copy the weight files in.")
    if need_tokenizer and not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ModelPathError(f"{path}: has no tokenizer files (tokenizer.json / tokenizer.model); "
                             "copy them from the model you fine-tuned from.")
    check_weight_files(path)
    return path


def check_weight_files(path: Path) -> None:
    """Every weight file must at least open: a safetensors header that covers the file, a complete zip for .bin."""
    import zipfile

    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # safetensors' own error type: a truncated file, or a git-lfs pointer
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelPathError(f"{f}: cannot be read as safetensors weights ({reason}); the file is incomplete "
                                 "(an interrupted download or a git-lfs pointer): download it again "
                                 "(git lfs pull, or hf download).") from None
    for f in sorted(path.glob("*.bin")):
        if f.name.startswith(("pytorch_model", "model")) and not zipfile.is_zipfile(f):
            raise ModelPathError(f"{f}: cannot be read as PyTorch weights (not a complete archive); the file is "
                                 "incomplete (an interrupted download or a git-lfs pointer): download it again.")


def check_tokenizer(path: str | os.PathLike):
    """Load the tokenizer of the model folder `path`, or say in one sentence why it cannot be read."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types here; the student needs the file and the fix
        message = " ".join(str(e).split())[:200]
        files = [f for f in TOKENIZER_FILES if (Path(path) / f).exists()]
        fix = ("install the missing package: pip install sentencepiece protobuf"
               if any(w in message for w in ("sentencepiece", "tiktoken", "protobuf")) else
               "copy the tokenizer files from the model's repository again")
        raise ModelPathError(f"{path}: its tokenizer ({', '.join(files) or 'no tokenizer files'}) cannot be read "
                             f"({type(e).__name__}: {message}); {fix}.") from None


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of a hub model: the cached snapshot (downloaded once, with network, when not cached)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id))
    except LocalEntryNotFoundError:
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ModelPathError(
            f"{repo_id}: this hub model is not in the local cache ({constants.HF_HUB_CACHE}) and {why}; download it "
            f"once where there is network (hf download {repo_id}) or give base_model as the folder that holds it."
        ) from None
    except HFValidationError:
        raise ModelPathError(f"{repo_id}: is neither a model folder nor a hub id (owner/name); give the folder that "
                             "holds config.json and the weights.") from None
    except HfHubHTTPError as e:  # no such repository, gated, no access
        raise ModelPathError(f"{repo_id}: the hub refused it ({' '.join(str(e).split())[:160]}); check the id "
                             "(owner/name), log in with `hf auth login` for a gated model, or give a local folder.") from None


def _local_model(path: Path, info: dict, work: Work) -> Path:
    """Check a model folder, convert an InternLM2 checkpoint once, check its tokenizer; record it in WORK/model."""
    path = check_model_dir(path).resolve()
    info["path"] = str(path)
    from .internlm2 import convert_internlm2, is_internlm2

    if is_internlm2(path):  # its remote code does not follow transformers: load a Llama-layout copy instead
        info["converted"] = str(convert_internlm2(path, work.converted_model))
    loadable = Path(info.get("converted", path))
    check_tokenizer(loadable)
    _write_record(work, info | {"identity": model_identity(loadable, _source(info))})
    return loadable


def _write_record(work: Work, info: dict) -> None:
    from .data import atomic_write_text

    atomic_write_text(work.model / RECORD_FILE, json.dumps(info, ensure_ascii=False, indent=1))


def _source(info: dict) -> str:
    """How the student named the base model: "tiny", a hub id, or the folder's name."""
    return "tiny" if info.get("kind") == "tiny" else info.get("id") or Path(info.get("path") or "?").name


def prepare_base_model(base_model: str, work: Work, seed: int = 0) -> Path:
    """Make WORK/model ready and return the folder to load the base model from.

    "tiny": build the embedded model in WORK/model; a local directory: check it and record it in
    WORK/model/course_model.json (the weights stay where they are, as the course's soft link does);
    "owner/name": a hub id, resolved once to its local snapshot folder (downloaded when not cached) and
    recorded with it. InternLM2 checkpoints are converted once to the Llama layout in WORK/model/converted.
    """
    if base_model in (None, "", "tiny"):
        path = build_tiny_model(work.model, seed=seed)
        info = _record(work)
        _write_record(work, info | {"identity": model_identity(path, _source(info))})
        return path
    work.model.mkdir(parents=True, exist_ok=True)
    if _looks_like_hub_id(str(base_model)):
        return _local_model(hub_snapshot(str(base_model)), {"kind": "hub", "id": str(base_model)}, work)
    return _local_model(Path(base_model).expanduser(), {"kind": "local"}, work)


def _record(work: Work) -> dict | None:
    record = work.model / RECORD_FILE
    return json.loads(record.read_text()) if record.exists() else None


def base_model_identity(work: Work, model_path: str | os.PathLike | None = None) -> dict:
    """What the base model is, by content, computed from its files now (their hashes are cached): source ("tiny",
    hub id or folder name), architecture, size, parameters and content_sha256 over its config, tokenizer and weight
    files (fingerprint.model_identity). `model_path`: the folder to identify (default: the one WORK/model records)."""
    info = _record(work)
    recorded = base_model_path(work) if info or model_path is None else None  # none recorded: says "run notebook 00"
    path = Path(model_path or recorded)
    same = recorded is not None and Path(recorded).resolve() == path.resolve()
    return model_identity(path, _source(info) if same else None)


def identity_table(identity: dict):
    """The base model's identity as a small table (what notebook 00 shows)."""
    import pandas as pd

    rows = {k: identity.get(k) for k in ("source", "architecture", "parameters", "hidden_size", "layers",
                                         "vocab_size", "content_sha256", "path")}
    rows["parameters"] = f"{rows['parameters']:,}"
    rows["files hashed"] = ", ".join(identity.get("files", {}))
    return pd.Series(rows, dtype=object).to_frame("base model")


def base_model_path(work: Work) -> str:
    """Where the base model prepared by notebook 00 lives (a directory; a hub id only in records of old runs)."""
    info = _record(work)
    if info is None:
        raise ModelPathError(f"{work.model}: no base model prepared here; run notebook 00 with this work_dir first.")
    if info["kind"] == "tiny":
        return str(work.model)
    return info.get("converted") or info.get("path") or info["id"]


def loadable_model_dir(path: str | os.PathLike) -> str:
    """The folder to load for `path`: a work dir's model/ folder that only records a real base model (notebook 00
    keeps its own copy of the tiny model, a record of any other) stands for the folder it records."""
    record = Path(path) / RECORD_FILE
    if record.exists() and not (Path(path) / "config.json").exists():
        info = json.loads(record.read_text())
        return info.get("converted") or info.get("path") or info.get("id") or str(path)
    return os.fspath(path)


def base_model_source(work: Work) -> str:
    """What the student gave as base_model (hub id or folder) for the model card; WORK/model for the tiny one."""
    info = _record(work) or {}
    return info.get("id") or info.get("path") or str(work.model)


def resolve_base_model(base_model: str | None, work: Work) -> str:
    """The folder to load for a notebook's `base_model` parameter, the same way in every notebook: None or the
    model notebook 00 recorded -> its recorded folder; another folder or hub id -> prepared and recorded now."""
    info = _record(work)
    if base_model in (None, "") or (info and (
            (base_model == "tiny" and info["kind"] == "tiny") or base_model == info.get("id")
            or (info.get("path") and Path(str(base_model)).expanduser().resolve() == Path(info["path"])))):
        return base_model_path(work)
    return str(prepare_base_model(str(base_model), work))
