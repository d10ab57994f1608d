"""In: the projector of XTuner's LLaVA pretrain (the course's stage 1), in transformers' LLaVA names."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoints import _deepspeed_state, _read_weight_files, load_checkpoint
from .settings import XTunerError


def read_projector(path: str | os.PathLike) -> dict:
    """The projector of XTuner's LLaVA pretrain (the course's stage 1), in transformers' LLaVA names (linear_1,
    linear_2): from its iter_N.pth (state_dict keys projector.model.0.weight, ...; a file or a DeepSpeed folder)
    or from pth_to_hf's projector/ folder (config.json of model_type 'projector' and model.safetensors or
    pytorch_model.bin, keys model.0.weight, ...)."""
    path = Path(path).expanduser()
    folder = path / "projector" if (path / "projector" / "config.json").is_file() else path
    if folder.is_dir() and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if config.get("model_type") != "projector":
            raise XTunerError(f"{folder}/config.json: model_type is {config.get('model_type')!r}, not 'projector'; "
                              "give the projector/ folder of the LLaVA pretrain's pth_to_hf output.")
        if config.get("depth", 2) != 2 or config.get("hidden_act", "gelu") != "gelu":
            raise XTunerError(f"{folder}/config.json: a projector of depth {config.get('depth')} with "
                              f"{config.get('hidden_act')!r}; the kit's LLaVA projector is two layers with GELU (depth 2).")
        state = _read_weight_files(folder, "*", "config.json but no model.safetensors or pytorch_model.bin",
                                   bins="pytorch_model*")
    elif path.is_file() or (path / "mp_rank_00_model_states.pt").is_file():
        checkpoint = _deepspeed_state(path) if path.is_dir() else load_checkpoint(path)
        checkpoint = checkpoint.get("state_dict", checkpoint)
        state = {k.removeprefix("projector."): v for k, v in checkpoint.items() if k.startswith("projector.")}
        if not state:
            raise XTunerError(f"{path}: holds no projector.* weights; give the LLaVA pretrain's checkpoint "
                              "(the course's iter_2181.pth), not a fine-tune's.")
    else:
        raise XTunerError(f"pretrained_projector {path}: is neither an XTuner LLaVA checkpoint (iter_N.pth) nor a "
                          "pth_to_hf projector/ folder; give one of those.")
    names = {"model.0.weight": "linear_1.weight", "model.0.bias": "linear_1.bias",
             "model.2.weight": "linear_2.weight", "model.2.bias": "linear_2.bias"}
    if set(state) != set(names):
        raise XTunerError(f"{path}: the projector holds {', '.join(sorted(state))}, not the two linear layers with "
                          "biases of XTuner's depth-2 projector; give the course's LLaVA pretrain output.")
    return {names[k]: v for k, v in state.items()}
