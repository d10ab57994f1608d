"""Out: the course's XTuner config and its fields beside the kit's knobs, and this run written as an XTuner config."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .settings import XTunerError

# (XTuner config field, the course's value, the kit's parameter in notebooks 01/02, note)
XTUNER_FIELDS = [
    ("pretrained_model_name_or_path", "/root/ft/model", "base_model", "notebook 00"),
    ("alpaca_en_path (data_path)", "/root/ft/data/personal_assistant.json", "data_path", "notebook 01 writes it"),
    ("prompt_template", "PROMPT_TEMPLATE.internlm2_chat", "(the tokenizer's chat template)", "one template for training and chat"),
    ("max_length", 1024, "max_length", ""),
    ("pack_to_max_length", True, "pack_to_max_length", ""),
    ("batch_size", 1, "batch_size", "per device"),
    ("accumulative_counts", 16, "gradient_accumulation", ""),
    ("max_epochs", 2, "epochs", "or max_steps"),
    ("optim_type / lr", "AdamW / 2e-4", "lr", "AdamW always"),
    ("max_norm", 1, "max_grad_norm", "preset"),
    ("warmup_ratio", 0.03, "warmup_ratio", "then cosine to 0"),
    ("save_steps / save_total_limit", "300 / 3", "save_steps / save_total_limit", ""),
    ("evaluation_freq", 300, "evaluation_freq", ""),
    ("SYSTEM", "''", "system", "notebook 01's"),
    ("evaluation_inputs", "['请你介绍一下你自己', '你是谁', '你是我的小助手吗']", "evaluation_inputs", "notebook 01's"),
    ("lora: r / lora_alpha / lora_dropout", "64 / 16 / 0.1", "lora_r / lora_alpha / lora_dropout", ""),
    ("quantization_config (load_in_4bit, nf4, double quant)", "4-bit NF4", "quantization", "'nf4' (or 'auto')"),
]


def xtuner_table(config):
    """The XTuner field, the course's value, the kit's parameter, and this run's value of it (a DataFrame)."""
    import pandas as pd

    def value(parameter: str):
        names = [n.strip() for n in parameter.split("/")]
        if not all(hasattr(config, n) for n in names):
            return ""
        return " / ".join(str(getattr(config, n)) for n in names)

    return pd.DataFrame([{"XTuner field": f, "course value": str(v), "kit parameter": p, "this run": value(p), "note": n}
                         for f, v, p, n in XTUNER_FIELDS]).set_index("XTuner field")


# This run as an XTuner config.
CONFIG_NAME = "internlm2_1_8b_qlora_alpaca_e3_copy.py"  # the name of camp2's copy of XTuner's config
CONFIG_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "xtuner_qlora_config.py"
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The kit's (Llama) module names -> InternLM2's; q, k and v are one fused `wqkv` there.
INTERNLM2_NAMES = {"q_proj": "wqkv", "k_proj": "wqkv", "v_proj": "wqkv", "o_proj": "wo", "gate_proj": "w1",
                   "up_proj": "w3", "down_proj": "w2", "lm_head": "output", "embed_tokens": "tok_embeddings"}
NF4_CONFIG = """        quantization_config=dict(
            type=BitsAndBytesConfig,
            load_in_4bit=True,
            load_in_8bit=False,
            llm_int8_threshold=6.0,
            llm_int8_has_fp16_weight=False,
            bnb_4bit_compute_dtype=torch.float16,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type='nf4'),
"""
NO_QUANTIZATION = "        # no quantization_config: the kit's run trained the LLM unquantised (quantization 'none')\n"


def xtuner_dir(work) -> Path:
    """WORK/xtuner: the exported config (and, by the printed command, XTuner's own work_dir)."""
    return work.root / "xtuner"


def _original_model(model_dir) -> Path:
    """The folder XTuner loads: for the kit's Llama-layout copy of InternLM2, the checkpoint it was made from."""
    from ..internlm2 import CONVERSION_RECORD

    record = Path(model_dir) / CONVERSION_RECORD
    return Path(json.loads(record.read_text())["source"]) if record.exists() else Path(model_dir)


def _prompt_template(model_dir: Path) -> str:
    """XTuner's PROMPT_TEMPLATE entry for the base model's chat format."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type", "").startswith("qwen"):
        return "qwen_chat"
    tokenizer_config = model_dir / "tokenizer_config.json"
    template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8") \
        if (model_dir / "chat_template.jinja").exists() else \
        json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template") or ""
    if config.get("model_type") == "internlm2" or "<|im_start|>" in template:
        return "internlm2_chat"  # InternLM2's format, which the kit's tiny model speaks too
    raise XTunerError(f"{model_dir}: its chat format is not one of XTuner's templates the kit knows "
                      "(internlm2_chat, qwen_chat); set prompt_template in the exported config by hand.")


def _target_modules(hyper: dict, internlm2: bool) -> list[str]:
    """The run's LoRA target modules, in the base model's own names (XTuner loads the original checkpoint)."""
    targets = hyper.get("target_modules") or "all-linear"
    names = list(LLAMA_LINEAR) if targets == "all-linear" else [targets] if isinstance(targets, str) else list(targets)
    names += ["lm_head"] if hyper.get("train_lm_head") else []
    return list(dict.fromkeys(INTERNLM2_NAMES.get(n, n) if internlm2 else n for n in names))


def config_settings(work) -> dict:
    """This run's settings under XTuner's names, read from WORK/adapter/training_record.json."""
    from ..internlm2 import is_internlm2

    path = work.adapter / "training_record.json"
    if not path.is_file():
        raise XTunerError(f"{path}: no training record; run notebook 02 with this work_dir first (the exported "
                          "config repeats that run).")
    record = json.loads(path.read_text(encoding="utf-8"))
    hyper = record["hyper_parameters"]
    per_update = hyper["gradient_accumulation"]  # XTuner counts batches, the kit updates
    model = _original_model(record["base_model"])
    settings = dict(
        pretrained_model_name_or_path=str(model), alpaca_en_path=record["data_file"],
        prompt_template=_prompt_template(model), max_length=hyper["max_length"],
        pack_to_max_length=hyper["pack_to_max_length"], batch_size=hyper["batch_size"], accumulative_counts=per_update,
        lr=hyper["lr"], max_norm=hyper["max_grad_norm"], warmup_ratio=hyper["warmup_ratio"],
        save_steps=hyper["save_steps"] * per_update, save_total_limit=hyper["save_total_limit"],
        evaluation_freq=hyper["evaluation_freq"] * per_update, SYSTEM=hyper.get("system") or "",
        evaluation_inputs=list(record.get("evaluation_inputs") or hyper.get("evaluation_inputs") or []),
        lora_r=hyper["lora_r"], lora_alpha=hyper["lora_alpha"], lora_dropout=hyper["lora_dropout"],
        target_modules=_target_modules(hyper, is_internlm2(model)), quantization=record.get("quantization", "nf4"),
        seed=hyper.get("seed", 0), logging_interval=hyper["logging_steps"] * per_update)
    if hyper.get("max_steps") and hyper["max_steps"] > 0:
        settings["max_iters"] = hyper["max_steps"] * per_update
    else:
        settings["max_epochs"] = hyper["epochs"]
    return settings | {"record": str(path), "kit": hyper}


def _schedule(length: str) -> str:
    """XTuner's warm-up + cosine schedule over max_epochs (by epoch, as the course) or max_iters."""
    by_epoch = length == "max_epochs"
    extra = ", convert_to_iter_based=True" if by_epoch else ""
    warm = f"warmup_ratio * {length}" if by_epoch else f"int(warmup_ratio * {length})"
    return ("param_scheduler = [\n"
            f"    dict(type=LinearLR, start_factor=1e-5, by_epoch={by_epoch}, begin=0, end={warm}{extra}),\n"
            f"    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch={by_epoch}, begin={warm}, end={length}{extra})\n"
            "]\n")


def render_config(settings: dict) -> str:
    """The text of the XTuner config for `settings` (config_settings)."""
    from string import Template

    length = "max_iters" if "max_iters" in settings else "max_epochs"
    values = {k: repr(v) for k, v in settings.items() if k not in ("kit", "quantization", "prompt_template")}
    values |= dict(prompt_template=settings["prompt_template"], length_name=length,
                   length_line=f"{length} = {settings[length]!r}" + ("  # the kit's max_steps x accumulative_counts"
                                                                     if length == "max_iters" else ""),
                   quantization=NF4_CONFIG if settings["quantization"] == "nf4" else NO_QUANTIZATION,
                   param_scheduler=_schedule(length), record=settings["record"],
                   kit_save_steps=settings["kit"]["save_steps"], kit_evaluation_freq=settings["kit"]["evaluation_freq"],
                   kit_logging_steps=settings["kit"]["logging_steps"])
    return Template(CONFIG_TEMPLATE.read_text(encoding="utf-8")).substitute(values)


def export_config(work, out: str | os.PathLike | None = None) -> Path:
    """Write this run's XTuner config (WORK/xtuner/internlm2_1_8b_qlora_alpaca_e3_copy.py unless `out`)."""
    from ..data import atomic_write_text

    out = Path(out) if out else xtuner_dir(work) / CONFIG_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render_config(config_settings(work)))
    return out
