"""What a model answers with by default: the system prompt it was trained with, kept beside the model
(chat_defaults.json), so the chat, the web demo and the published app ask as training did."""
from __future__ import annotations

import os
from pathlib import Path

from .base_model import ModelPathError

CHAT_DEFAULTS_FILE = "chat_defaults.json"  # beside a model: the system prompt it was trained with


def trained_system_prompt(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None) -> str | None:
    """The system prompt the model was trained with: the adapter's training_record.json (hyper_parameters.system),
    else the model folder's chat_defaults.json (what merge writes) or training_record.json; None when none says."""
    import json

    for folder in [adapter, model_dir] if adapter else [model_dir]:
        for name, keys in ((CHAT_DEFAULTS_FILE, ("system",)), ("training_record.json", ("hyper_parameters", "system"))):
            path = Path(folder) / name
            if not path.is_file():
                continue
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
                for key in keys:
                    value = value[key]
            except (ValueError, KeyError, TypeError):
                raise ModelPathError(f"{path}: has no readable '{'.'.join(keys)}' field; fix or delete the file "
                                     "(or pass the system prompt with --system).") from None
            if not isinstance(value, str):
                raise ModelPathError(f"{path}: '{'.'.join(keys)}' is {value!r}, not text; write the system "
                                     "prompt as a string.")
            return value
    return None


def write_chat_defaults(model_dir: str | os.PathLike, system: str) -> Path:
    """MODEL/chat_defaults.json: the system prompt the model answers with by default (chat, web demo, app)."""
    import json

    path = Path(model_dir) / CHAT_DEFAULTS_FILE
    path.write_text(json.dumps({"system": system}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path
