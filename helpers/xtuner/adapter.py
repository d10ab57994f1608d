"""In: an XTuner adapter converted into the kit's PEFT adapter on the Llama layout (WORK/adapter)."""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

from .checkpoints import (XTUNER_RECORD, XTUNER_VERSION, _config_beside, _deepspeed_state,
                          _read_weight_files, _source_format, load_checkpoint, source_sha256)
from .settings import XTunerError, lora_settings, read_settings

# InternLM2's top-level modules -> the kit's (per-layer ones are in internlm2.LAYER_RENAMES).
TOP_RENAMES = {"model.tok_embeddings": "model.embed_tokens", "output": "lm_head", "model.norm": "model.norm"}
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+?)\.(?P<part>(?:lora_(?:A|B|embedding_A|embedding_B|"
                      r"magnitude_vector))(?:\.weight)?|weight|bias)$")



def _peft_names(state: dict, source: Path) -> dict:
    """An XTuner model's state_dict (llm.base_model.model.<name>.lora_A.default.weight) -> the names PEFT saves
    (base_model.model.<name>.lora_A.weight), as pth_to_hf's save_pretrained writes them."""
    if any(k.startswith(("projector.", "visual_encoder.")) for k in state):
        raise XTunerError(f"{source}: is a LLaVA checkpoint (it holds a projector); give it to notebook 05 as "
                          "pretrained_projector, not as adapter_dir.")
    out = {}
    for key, tensor in state.items():
        if "lora_" in key or "modules_to_save." in key:
            name = key.removeprefix("llm.").replace("modules_to_save.", "").replace(".default", "")
            out[name] = tensor
    if not out:
        raise XTunerError(f"{source}: holds no LoRA weights; give the checkpoint of a LoRA or QLoRA run "
                          "(the course's internlm2_1_8b_qlora_alpaca_e3).")
    return out


def read_xtuner_adapter(source: str | os.PathLike) -> tuple[dict, dict, str | None]:
    """(weights under PEFT's names, LoRA settings, the training config's text or None) of an XTuner adapter."""
    source = Path(source)
    kind = _source_format(source)
    if kind == "pth_to_hf":
        config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
        weights = _read_weight_files(source, "adapter_model*", "adapter_config.json but no adapter_model.safetensors or .bin")
        text = (source / "xtuner_config.py").read_text(encoding="utf-8") if (source / "xtuner_config.py").exists() else None
        return weights, {k: config[k] for k in ("r", "lora_alpha", "lora_dropout", "bias") if k in config}, text
    if kind == "checkpoint":
        checkpoint = load_checkpoint(source)
        state = checkpoint.get("state_dict", checkpoint)
        meta = checkpoint.get("meta")
        text = meta.get("cfg") if isinstance(meta, dict) and isinstance(meta.get("cfg"), str) else None
    else:
        state, text = _deepspeed_state(source), None
    weights = _peft_names(state, source)
    text = text if text and lora_settings(text) else _config_beside(source)
    settings = lora_settings(text) if text else {}
    if "lora_alpha" not in settings:
        raise XTunerError(f"{source}: its LoRA's lora_alpha is recorded only in the training config, which is not "
                          "beside it; copy the config you trained with (e.g. internlm2_1_8b_qlora_alpaca_e3_copy.py) "
                          "into its folder.")
    return weights, settings, text


def _split_rows(tensor, cfg: dict, source: Path, key: str):
    from ..internlm2 import split_wqkv

    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg["hidden_size"] // heads
    if tensor.shape[0] != (heads + 2 * kv_heads) * head_dim:
        raise XTunerError(f"{source}: {key} has {tensor.shape[0]} rows where this base model's wqkv has "
                          f"{(heads + 2 * kv_heads) * head_dim}; it was trained on another model, give its own base.")
    return split_wqkv(tensor, heads, kv_heads, head_dim)


def to_kit_names(weights: dict, cfg: dict, source: Path) -> tuple[dict, set, set]:
    """PEFT weights in InternLM2's names -> the kit's Llama layout, as internlm2.convert_state_dict does for the
    model: a LoRA on the fused wqkv keeps one lora_A for q, k and v and its lora_B is split by rows as the
    weight is. Returns (weights, LoRA target modules, fully saved modules)."""
    from ..internlm2 import LAYER_RENAMES

    out, targets, saved = {}, set(), set()
    for key, tensor in weights.items():
        match = LORA_KEY.match(key)
        if not match:
            raise XTunerError(f"{source}: tensor {key!r} is not a LoRA weight the kit can place; give an adapter "
                              "of a LoRA run (the course's QLoRA config).")
        module, part = match["module"], match["part"]
        layer = re.match(r"^model\.layers\.(\d+)\.(.+)$", module)
        if layer and layer[2] == "attention.wqkv":
            prefix = f"model.layers.{layer[1]}.self_attn."
            shared = part.startswith(("lora_A", "lora_embedding_A"))  # wqkv = B·A: A reads the input, shared
            parts = [tensor] * 3 if shared else _split_rows(tensor, cfg, source, key)
            renamed = {f"{prefix}{p}_proj": t.clone() for p, t in zip("qkv", parts)}
        elif layer and layer[2] in LAYER_RENAMES:
            renamed = {f"model.layers.{layer[1]}.{LAYER_RENAMES[layer[2]]}": tensor}
        elif module in TOP_RENAMES:
            renamed = {TOP_RENAMES[module]: tensor}
        elif re.match(r"^(model\.layers\.\d+\.(self_attn|mlp)\.\w+|model\.embed_tokens|lm_head)$", module):
            renamed = {module: tensor}  # the kit's names already: an XTuner run on a Llama-layout base
        else:
            raise XTunerError(f"{source}: tensor {key!r} belongs to module {module!r}, which the kit's model "
                              "does not have; give an adapter trained on this base model.")
        for name, t in renamed.items():
            out[f"base_model.model.{name}.{part}"] = t.contiguous()
            (saved if part in ("weight", "bias") else targets).add(name.rpartition(".")[2])
    return out, targets, saved


def convert_adapter(source: str | os.PathLike, base_model: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write the kit's PEFT adapter for an XTuner adapter or checkpoint into the (empty) folder `dest`: weights in
    the base model's Llama layout, adapter_config.json, and chat_defaults.json with the config's SYSTEM."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from ..chat_defaults import write_chat_defaults

    source, base_model, dest = Path(source), Path(base_model), Path(dest)
    weights, settings, text = read_xtuner_adapter(source)
    cfg = json.loads((base_model / "config.json").read_text(encoding="utf-8"))
    kit, targets, saved = to_kit_names(weights, cfg, source)
    rank = next(t.shape[0] for k, t in kit.items() if ".lora_A." in k or k.endswith(".lora_A"))
    config = LoraConfig(r=int(settings.get("r", rank)), lora_alpha=settings["lora_alpha"],
                        lora_dropout=float(settings.get("lora_dropout", 0.0)), bias=settings.get("bias", "none"),
                        target_modules=sorted(targets), modules_to_save=sorted(saved) or None, task_type="CAUSAL_LM",
                        base_model_name_or_path=str(base_model))
    config.save_pretrained(str(dest))
    save_file(kit, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    system = read_settings(text).get("SYSTEM") if text else None
    if isinstance(system, str):  # the system prompt XTuner trained with: chat, merge and app start with it
        write_chat_defaults(dest, system)
    return dest


@contextmanager
def converted_adapter(source: str | os.PathLike, base_model: str | os.PathLike):
    """The kit's adapter for an XTuner one, in a temporary folder while the block runs (a chat session)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="xtuner-adapter-") as tmp:
        yield convert_adapter(source, base_model, tmp)


def import_adapter(work, adapter_dir: str | os.PathLike | None = None) -> Path:
    """WORK/adapter for a notebook's `adapter_dir`: None keeps the one notebook 02 trained; XTuner's pth_to_hf
    folder or iter_N.pth checkpoint is converted into WORK/adapter (converted_from_xtuner.json says from what;
    reused while the source and base are unchanged). An adapter notebook 02 trained is never replaced."""
    from ..base_model import base_model_path
    from ..paths import staged_dir

    if adapter_dir in (None, "") or Path(adapter_dir).expanduser().resolve() == work.adapter.resolve():
        return work.adapter
    source = Path(adapter_dir).expanduser().resolve()
    if not source.exists():
        raise XTunerError(f"adapter_dir {source}: no such file or folder; give XTuner's pth_to_hf output folder "
                          "or its iter_N.pth checkpoint (None: the adapter notebook 02 trained).")
    kind = _source_format(source)
    base = Path(base_model_path(work))
    stamp = {"version": XTUNER_VERSION, "source": str(source), "format": kind, "source_sha256": source_sha256(source),
             "base_model": str(base)}
    record = work.adapter / XTUNER_RECORD
    if record.exists() and json.loads(record.read_text(encoding="utf-8")) == stamp:
        return work.adapter
    if (work.adapter / "adapter_config.json").exists() and not record.exists():
        raise XTunerError(f"{work.adapter}: holds the adapter notebook 02 trained, which converting {source} would "
                          "replace; use a new work_dir for the XTuner adapter (run notebooks 00 and 01 there) or "
                          f"delete {work.adapter} first.")
    with staged_dir(work.adapter) as tmp:
        convert_adapter(source, base, tmp)
        (tmp / XTUNER_RECORD).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
    return work.adapter
