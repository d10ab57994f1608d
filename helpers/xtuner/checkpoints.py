"""In: XTuner's adapter files as they lie on disk (pth_to_hf output, mmengine's iter_N.pth, a DeepSpeed iter_N.pth
folder), read without XTuner, mmengine or DeepSpeed installed."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .settings import XTunerError, lora_settings

XTUNER_RECORD = "converted_from_xtuner.json"  # in WORK/adapter: which XTuner file it was converted from
XTUNER_VERSION = 1
FORMATS = {"pth_to_hf": "XTuner's pth_to_hf output (a PEFT adapter folder)",
           "checkpoint": "an XTuner iter_N.pth checkpoint",
           "deepspeed": "an XTuner iter_N.pth DeepSpeed checkpoint folder"}
INTERNLM2_LINEAR = {"wqkv", "wo", "w1", "w2", "w3"}


class _Foreign:
    """Stands in for a class a checkpoint names but the kit does not need (mmengine's message hub, DeepSpeed's
    loss scaler): nothing of it is imported or run, so a checkpoint is read as safely as weights_only allows."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _read_weight_files(folder: Path, stem: str, lacking: str, bins: str | None = None) -> dict:
    """Every tensor of a pth_to_hf folder's safetensors files (or, failing those, its .bin files), merged into one
    dict; one sentence when the folder has neither."""
    from safetensors.torch import load_file

    files = sorted(folder.glob(f"{stem}.safetensors")) or sorted(folder.glob(f"{bins or stem}.bin"))
    if not files:
        raise XTunerError(f"{folder}: has {lacking}; run `xtuner convert pth_to_hf` again.")
    weights = {}
    for f in files:
        weights.update(load_file(str(f)) if f.suffix == ".safetensors" else load_checkpoint(f))
    return weights


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A torch checkpoint read with weights_only, the classes of other libraries in it replaced by stand-ins."""
    import torch

    path = Path(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        stand_ins = [type(n.rpartition(".")[2], (_Foreign,), {"__module__": n.rpartition(".")[0]}) for n in names]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise XTunerError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}); give XTuner's "
                          "iter_N.pth as `xtuner train` saved it (copy it again if it was cut short).") from None


def _internlm2_named(folder: Path) -> bool:
    config = folder / "adapter_config.json"
    try:
        targets = json.loads(config.read_text(encoding="utf-8")).get("target_modules") or []
    except (OSError, ValueError):
        return False
    return bool(INTERNLM2_LINEAR & set([targets] if isinstance(targets, str) else targets))


def xtuner_format(path: str | os.PathLike) -> str | None:
    """Which of XTuner's adapter files `path` is ('pth_to_hf' only for one in InternLM2's names, which PEFT
    cannot put on the kit's model), or None."""
    path = Path(path)
    if path.is_file():
        return "checkpoint" if path.suffix in (".pth", ".pt") else None
    if (path / "mp_rank_00_model_states.pt").is_file():
        return "deepspeed"
    return "pth_to_hf" if path.is_dir() and _internlm2_named(path) else None


def xtuner_hint(path: str | os.PathLike) -> str | None:
    """One sentence for `path` when it is an XTuner adapter given where a kit adapter folder is expected."""
    kind = xtuner_format(path)
    return None if kind is None else (
        f"{path}: is {FORMATS[kind]}; pass it as adapter_dir to notebooks 03/04/06 (or run `python -m helpers "
        f"xtuner import-adapter {path} WORK`), which converts it into WORK/adapter.")


def _source_format(source: Path) -> str:
    kind = xtuner_format(source)
    if kind is None and source.is_dir() and (source / "adapter_config.json").is_file():
        kind = "pth_to_hf"  # pth_to_hf output of a base whose names are the kit's already (Qwen, Llama)
    if kind is None:
        raise XTunerError(f"{source}: is neither XTuner's pth_to_hf output (a folder with adapter_config.json) "
                          "nor an XTuner checkpoint (iter_N.pth, a file or a DeepSpeed folder); give one of those.")
    return kind


def _deepspeed_state(folder: Path) -> dict:
    """The trainable weights of a DeepSpeed ZeRO-1/2 checkpoint folder, from the float32 master copies in its
    *_optim_states.pt files (as XTuner's pth_to_hf reads them), without DeepSpeed installed."""
    import math

    import torch

    model_states = load_checkpoint(folder / "mp_rank_00_model_states.pt")
    key = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731 rank 2 before 10
    files = sorted(folder.glob("*_optim_states.pt"), key=key)
    if not files:
        raise XTunerError(f"{folder}: has no *_optim_states.pt files beside mp_rank_00_model_states.pt; copy the "
                          "whole iter_N.pth folder, or convert it with `xtuner convert pth_to_hf` and give that.")
    parts = [load_checkpoint(f)["optimizer_state_dict"] for f in files]
    stage, ranks = parts[0].get("zero_stage"), parts[0].get("partition_count")
    ranks = max(ranks) if isinstance(ranks, list) else ranks
    if stage is None or stage > 2:
        raise XTunerError(f"{folder}: is a DeepSpeed ZeRO-{stage} checkpoint, which the kit does not read; convert it "
                          "with `xtuner convert pth_to_hf CONFIG {folder} OUT` and give OUT.")
    if ranks != len(files):
        raise XTunerError(f"{folder}: was saved by {ranks} processes but holds {len(files)} *_optim_states.pt files; "
                          "copy the whole folder again.")
    state = {}
    for group, shapes in enumerate(model_states["param_shapes"]):
        flat = torch.cat([p["single_partition_of_fp32_groups"][group] for p in parts])
        offset = 0
        for name, shape in shapes.items():
            count = math.prod(shape)
            state[name] = flat[offset:offset + count].view(tuple(shape)).clone()
            offset += count
    return state


def _config_beside(source: Path) -> str | None:
    """The training config `xtuner train` copied into its work_dir, beside the checkpoint."""
    for path in sorted(source.parent.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            if lora_settings(text):
                return text
        except SyntaxError:
            continue
    return None


def source_sha256(source: Path) -> str:
    """One hash of a checkpoint file, or of every file in a folder (a DeepSpeed checkpoint, pth_to_hf output)."""
    from ..fingerprint import combined_sha256, file_sha256

    if source.is_file():
        return file_sha256(source)
    return combined_sha256({str(p.relative_to(source)): file_sha256(p) for p in sorted(source.rglob("*"))
                            if p.is_file() and not p.name.startswith(".")})
