"""The error every XTuner step raises, and what the kit reads of an XTuner config's text (its settings, its LoRA)."""
from __future__ import annotations



class XTunerError(ValueError):
    """An XTuner file the kit cannot read, or a run it cannot export; the message names the file and the fix."""


def read_settings(text: str) -> dict:
    """The top-level settings of an XTuner config (its text) whose values are plain literals."""
    import ast

    settings = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                settings[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return settings


def lora_settings(text: str) -> dict:
    """r, lora_alpha, lora_dropout, bias of the LoRA in an XTuner config (its file, or the copy mmengine keeps
    in a checkpoint's meta), from the dict(...) that sets lora_alpha; {} when there is none."""
    import ast

    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and any(k.arg == "lora_alpha" for k in node.keywords):
            found = {}
            for k in node.keywords:
                if k.arg in ("r", "lora_alpha", "lora_dropout", "bias"):
                    try:
                        found[k.arg] = ast.literal_eval(k.value)
                    except ValueError:
                        continue
            return found
    return {}
