"""How the course's XTuner config (internlm2_chat_1_8b_qlora_alpaca_e3_copy.py) maps onto the kit's knobs."""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

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


# ---------------------------------------------------------------- out: this run as an XTuner config
CONFIG_NAME = "internlm2_1_8b_qlora_alpaca_e3_copy.py"  # the name of camp2's copy of XTuner's config
CONFIG_TEMPLATE = Path(__file__).resolve().parent / "templates" / "xtuner_qlora_config.py"
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


class XTunerError(ValueError):
    """An XTuner file the kit cannot read, or a run it cannot export; the message names the file and the fix."""


def xtuner_dir(work) -> Path:
    """WORK/xtuner: the exported config (and, by the printed command, XTuner's own work_dir)."""
    return work.root / "xtuner"


def _original_model(model_dir) -> Path:
    """The folder XTuner loads: for the kit's Llama-layout copy of InternLM2, the checkpoint it was made from."""
    from .internlm2 import CONVERSION_RECORD

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
    from .internlm2 import is_internlm2

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
    from .data import atomic_write_text

    out = Path(out) if out else xtuner_dir(work) / CONFIG_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render_config(config_settings(work)))
    return out


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


# ---------------------------------------------------------------- in: XTuner's adapters and checkpoints
XTUNER_RECORD = "converted_from_xtuner.json"  # in WORK/adapter: which XTuner file it was converted from
XTUNER_VERSION = 1
FORMATS = {"pth_to_hf": "XTuner's pth_to_hf output (a PEFT adapter folder)",
           "checkpoint": "an XTuner iter_N.pth checkpoint",
           "deepspeed": "an XTuner iter_N.pth DeepSpeed checkpoint folder"}
INTERNLM2_LINEAR = {"wqkv", "wo", "w1", "w2", "w3"}
# InternLM2's top-level modules -> the kit's (per-layer ones are in internlm2.LAYER_RENAMES).
TOP_RENAMES = {"model.tok_embeddings": "model.embed_tokens", "output": "lm_head", "model.norm": "model.norm"}
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+?)\.(?P<part>(?:lora_(?:A|B|embedding_A|embedding_B|"
                      r"magnitude_vector))(?:\.weight)?|weight|bias)$")


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
    from .internlm2 import split_wqkv

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
    from .internlm2 import LAYER_RENAMES

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

    from .chat_defaults import write_chat_defaults

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


def source_sha256(source: Path) -> str:
    """One hash of a checkpoint file, or of every file in a folder (a DeepSpeed checkpoint, pth_to_hf output)."""
    from .fingerprint import combined_sha256, file_sha256

    if source.is_file():
        return file_sha256(source)
    return combined_sha256({str(p.relative_to(source)): file_sha256(p) for p in sorted(source.rglob("*"))
                            if p.is_file() and not p.name.startswith(".")})


def import_adapter(work, adapter_dir: str | os.PathLike | None = None) -> Path:
    """WORK/adapter for a notebook's `adapter_dir`: None keeps the one notebook 02 trained; XTuner's pth_to_hf
    folder or iter_N.pth checkpoint is converted into WORK/adapter (converted_from_xtuner.json says from what;
    reused while the source and base are unchanged). An adapter notebook 02 trained is never replaced."""
    from .base_model import base_model_path
    from .paths import staged_dir

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


# ---------------------------------------------------------------- in: the LLaVA pretrain's projector
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


# ---------------------------------------------------------------- command line
def add_command(sub) -> None:
    p = sub.add_parser("xtuner", help="XTuner in and out: export this run's config, import an XTuner adapter")
    verbs = p.add_subparsers(dest="verb", required=True)
    export = verbs.add_parser("export-config", help="write the run's XTuner config (from WORK/adapter's record)")
    export.add_argument("work_dir", help="the run's work directory")
    export.add_argument("--out", default=None, help=f"the config file (default: WORK/xtuner/{CONFIG_NAME})")
    export.set_defaults(func=_export)
    imports = verbs.add_parser("import-adapter", help="convert XTuner's pth_to_hf folder or iter_N.pth into WORK/adapter")
    imports.add_argument("source", help="XTuner's pth_to_hf output folder, or an iter_N.pth file or folder")
    imports.add_argument("work_dir", help="the work directory whose base model (notebook 00) the adapter belongs to")
    imports.set_defaults(func=_import)


def _export(args) -> int:
    import sys

    from .paths import work

    try:
        path = export_config(work(args.work_dir, create=False), args.out)
    except XTunerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"XTuner config: {path}\nin XTuner:     xtuner train {path} --work-dir {path.parent / 'train'}"
          f"\nthen:          xtuner convert pth_to_hf {path} {path.parent / 'train'}/iter_N.pth {path.parent / 'huggingface'}")
    return 0


def _import(args) -> int:
    import sys

    from .base_model import ModelPathError
    from .paths import work

    try:
        path = import_adapter(work(args.work_dir, create=False), args.source)
    except (XTunerError, ModelPathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"adapter: {path} (from {args.source}); merge it with notebook 03 or chat: "
          f"python -m helpers chat {args.work_dir}/model --adapter {path}")
    return 0
