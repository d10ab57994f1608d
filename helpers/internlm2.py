"""internlm2-chat checkpoints without remote code: a one-time conversion to the Llama layout.

InternLM2 is a Llama-shaped model whose checkpoint fuses q/k/v into one `wqkv` matrix and names
things its own way; its remote modelling code does not follow current transformers. The conversion
renames the tensors, splits `wqkv` per key-value group, maps the config, and keeps the tokenizer and
its chat template, so the kit loads it with AutoModelForCausalLM and no trust_remote_code.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .paths import staged_dir

CONVERSION_RECORD = "converted_from_internlm2.json"
CONVERSION_VERSION = 1
# Per-layer tensors: InternLM2 name -> Llama name (wqkv is split separately).
LAYER_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
REMOTE_FILES = ("configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py",
                "tokenization_internlm2_fast.py")


class ConversionError(ValueError):
    """An InternLM2 checkpoint the conversion cannot read; the message says what is wrong."""


def is_internlm2(model_dir: str | os.PathLike) -> bool:
    config = Path(model_dir) / "config.json"
    return config.exists() and json.loads(config.read_text()).get("model_type") == "internlm2"


def llama_config(cfg: dict) -> dict:
    """InternLM2 config.json -> the keyword arguments of a LlamaConfig."""
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        rope = rope | {"rope_type": kind, **{k: v for k, v in scaling.items() if k not in ("type", "rope_type")}}
    return dict(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
        hidden_act=cfg.get("hidden_act", "silu"), max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_parameters=rope, attention_bias=bool(cfg.get("bias", False)),
        mlp_bias=False, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"),
        initializer_range=cfg.get("initializer_range", 0.02),
    )


def split_wqkv(wqkv, num_heads: int, num_kv_heads: int, head_dim: int):
    """Fused rows [for each kv group: its q heads..., k, v] (head_dim rows each) -> (q, k, v).

    Works for a weight (rows x hidden) and for a bias (rows,).
    """
    group = num_heads // num_kv_heads
    tail = wqkv.shape[1:]
    fused = wqkv.reshape(num_kv_heads, group + 2, head_dim, *tail)
    q = fused[:, :group].reshape(num_heads * head_dim, *tail)
    k = fused[:, group].reshape(num_kv_heads * head_dim, *tail)
    v = fused[:, group + 1].reshape(num_kv_heads * head_dim, *tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


def convert_state_dict(state: dict, cfg: dict) -> dict:
    """InternLM2 tensor names and fused wqkv -> a LlamaForCausalLM state dict."""
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg["hidden_size"] // heads
    out = {}
    for name, tensor in state.items():
        if name == "model.tok_embeddings.weight":
            out["model.embed_tokens.weight"] = tensor
        elif name == "output.weight":
            out["lm_head.weight"] = tensor
        elif name == "model.norm.weight":
            out[name] = tensor
        elif name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            module, _, kind = rest.rpartition(".")
            prefix = f"model.layers.{index}."
            if module == "attention.wqkv":
                q, k, v = split_wqkv(tensor, heads, kv_heads, head_dim)
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"{prefix}self_attn.{proj}.{kind}"] = part
            elif module in LAYER_RENAMES:
                out[f"{prefix}{LAYER_RENAMES[module]}.{kind}"] = tensor
            elif "rotary_emb" in module:
                continue  # recomputed from the config
            else:
                raise ConversionError(f"tensor {name!r} is not part of the InternLM2 layout the kit knows; "
                                      "is this an internlm2 chat checkpoint?")
        else:
            raise ConversionError(f"tensor {name!r} is not part of the InternLM2 layout the kit knows; "
                                  "is this an internlm2 chat checkpoint?")
    return out


def _read_state_dict(src: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    state = {}
    if files:
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise ConversionError(f"{src}: no *.safetensors or pytorch_model*.bin weights to convert; finish the download.")
    for f in bins:
        state.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return state


def _convert_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer, pointing its config at a built-in class instead of the remote one."""
    for f in src.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens_map", "added_tokens"))
                            or f.name in ("generation_config.json", "chat_template.jinja")):
            shutil.copy2(f, dst / f.name)
    tok_cfg_path = dst / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
    tok_cfg.pop("auto_map", None)
    # tokenizer.json: the fast tokenizer as is; only a sentencepiece tokenizer.model: read as Llama's (same BPE).
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast" if (dst / "tokenizer.json").exists() else "LlamaTokenizer"
    tok_cfg_path.write_text(json.dumps(tok_cfg, ensure_ascii=False, indent=1))
    if not (dst / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(dst)).save_pretrained(str(dst))  # writes tokenizer.json once


def convert_internlm2(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the Llama-layout copy of the InternLM2 checkpoint in `src` to `dst` (reused when up to date)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src, dst = Path(src).resolve(), Path(dst)
    if not is_internlm2(src):
        raise ConversionError(f"{src}/config.json does not say model_type 'internlm2'; nothing to convert.")
    stamp = {"version": CONVERSION_VERSION, "source": str(src),
             "source_files": {f.name: f.stat().st_size for f in sorted(src.iterdir()) if f.is_file()}}
    record = dst / CONVERSION_RECORD
    if record.exists() and json.loads(record.read_text()) == stamp:
        return dst
    cfg = json.loads((src / "config.json").read_text())
    state = convert_state_dict(_read_state_dict(src), cfg)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(cfg.get("torch_dtype")), torch.float32)
    config = LlamaConfig(**llama_config(cfg))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    missing = set(model.state_dict()) - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing:
        raise ConversionError(f"{src}: the checkpoint lacks {sorted(missing)[:3]}...; the download is incomplete.")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(dtype)
    with staged_dir(dst) as tmp:
        model.save_pretrained(str(tmp))
        _convert_tokenizer(src, tmp)
        (tmp / CONVERSION_RECORD).write_text(json.dumps(stamp, indent=1))
    return dst
