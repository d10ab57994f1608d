"""Choosing the base model: the embedded tiny one, a local Hugging Face model directory, or a hub id."""
from __future__ import annotations

import json
import os
from pathlib import Path

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
    return path


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def prepare_base_model(base_model: str, work: Work, seed: int = 0) -> Path:
    """Make WORK/model ready and return the path (or hub id) to load the base model from.

    "tiny": build the embedded model in WORK/model; a local directory: check it and record it in
    WORK/model/course_model.json (the weights stay where they are, as the course's soft link does);
    "owner/name": a hub id, recorded; loading it needs network.
    """
    if base_model in (None, "", "tiny"):
        return build_tiny_model(work.model, seed=seed)
    work.model.mkdir(parents=True, exist_ok=True)
    record = work.model / RECORD_FILE
    if _looks_like_hub_id(str(base_model)):
        record.write_text(json.dumps({"kind": "hub", "id": base_model}, indent=1))
        return Path(base_model)
    path = check_model_dir(base_model).resolve()
    info = {"kind": "local", "path": str(path)}
    from .internlm2 import convert_internlm2, is_internlm2

    if is_internlm2(path):  # its remote code does not follow transformers: load a Llama-layout copy instead
        info["converted"] = str(convert_internlm2(path, work.converted_model))
    record.write_text(json.dumps(info, indent=1))
    return Path(info.get("converted", path))


def base_model_path(work: Work) -> str:
    """Where the base model prepared by notebook 00 lives (a directory, or a hub id)."""
    record = work.model / RECORD_FILE
    if not record.exists():
        raise ModelPathError(f"{work.model}: no base model prepared here; run notebook 00 with this work_dir first.")
    info = json.loads(record.read_text())
    if info["kind"] == "tiny":
        return str(work.model)
    if info["kind"] == "hub":
        return info["id"]
    return info.get("converted", info["path"])
