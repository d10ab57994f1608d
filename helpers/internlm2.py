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
CONVERSION_VERSION = 3  # 2: the tokenizer built from tokenizer.model with InternLM2's ids; 3: special ids agree
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


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def internlm2_tokenizer(model_dir: str | os.PathLike):
    """InternLM2's tokenizer.model + tokenizer_config.json -> a fast tokenizer that gives InternLM2's own ids.

    transformers' SentencePieceExtractor reads the pieces; the rest is InternLM2's and written here:
    byte-fallback BPE merged by piece score, no dummy prefix ("▁" only where the text has a space),
    sentencepiece's user-defined pieces kept whole, and the special tokens of `added_tokens_decoder`
    at their real ids (they rename pieces, e.g. 92542 [UNUSED_TOKEN_145] -> <|im_end|>, never append).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    model_dir = Path(model_dir)
    proto = _read_sentencepiece(model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    renamed = {int(i): t for i, t in config.get("added_tokens_decoder", {}).items()}
    pieces = [p.piece for p in proto.pieces]
    for index, token in renamed.items():
        if index >= len(pieces):
            raise ConversionError(f"{config_path}: added_tokens_decoder names id {index}, but {model_dir}/tokenizer.model "
                                  f"has only {len(pieces)} pieces; the two files come from different models.")
        pieces[index] = token["content"]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    whole = {i for i, p in enumerate(proto.pieces) if p.type in (2, 3, 4)} | set(renamed)  # unk, control, user-defined
    scores = {pieces[i]: p.score for i, p in enumerate(proto.pieces) if i not in whole}
    merges = generate_merges(vocab, scores, skip_tokens={pieces[i] for i in whole})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                                   byte_fallback=proto.trainer_spec.byte_fallback))
    backend.normalizer = normalizers.Replace(" ", "▁")  # add_dummy_prefix false: no "▁" in front of the text
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_tokens([AddedToken(pieces[i], normalized=False, special=bool(renamed[i].get("special", True))
                                   if i in renamed else proto.pieces[i].type != 4) for i in sorted(whole)])
    named = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    extra = [t for t in (_token_text(t) for t in config.get("additional_special_tokens", [])) if t]
    extra += [t["content"] for _, t in sorted(renamed.items()) if t.get("special", True)
              and t["content"] not in extra and t["content"] not in named.values()]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, **{k: v for k, v in named.items() if v}, additional_special_tokens=extra,
        add_bos_token=bool(config.get("add_bos_token", True)), add_eos_token=bool(config.get("add_eos_token", False)),
        clean_up_tokenization_spaces=False, model_max_length=config.get("model_max_length", 32768),
        padding_side=config.get("padding_side", "right"))
    if config.get("chat_template"):
        tokenizer.chat_template = config["chat_template"]
    if len(tokenizer) != len(proto.pieces):
        raise ConversionError(f"{config_path}: its special tokens would add ids beyond the {len(proto.pieces)} pieces of "
                              "tokenizer.model; name them in added_tokens_decoder at the ids they rename.")
    return tokenizer


def _read_sentencepiece(model_dir: Path):
    """The ModelProto of model_dir/tokenizer.model, or one sentence saying why it cannot be read."""
    path = model_dir / "tokenizer.model"
    try:
        from transformers.convert_slow_tokenizer import SentencePieceExtractor

        return SentencePieceExtractor(str(path)).proto
    except ImportError as e:
        raise ConversionError(f"{model_dir}: reading its tokenizer.model needs the sentencepiece and protobuf packages "
                              f"({e}); install them: pip install sentencepiece protobuf.") from None
    except FileNotFoundError:
        raise ConversionError(f"{model_dir}: has no tokenizer.model (nor tokenizer.json); copy the tokenizer files "
                              "from the model's repository.") from None
    except Exception as e:  # protobuf's DecodeError and friends: the file is not a sentencepiece model
        raise ConversionError(f"{path}: cannot be read as a sentencepiece model ({type(e).__name__}); the download is "
                              "probably incomplete (a git-lfs pointer?): download tokenizer.model again.") from None


def _convert_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer in a form transformers reads without remote code, and a generation_config that stops
    where the chat template ends a turn."""
    from transformers import AutoTokenizer, GenerationConfig

    from .template import stop_token_ids

    if (src / "tokenizer.json").exists():  # a fast tokenizer already: keep it, point its config at a built-in class
        for f in src.iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens_map", "added_tokens"))
                                or f.name == "chat_template.jinja"):
                shutil.copy2(f, dst / f.name)
        tok_cfg_path = dst / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
        tok_cfg.pop("auto_map", None)
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_cfg_path.write_text(json.dumps(tok_cfg, ensure_ascii=False, indent=1))
        tokenizer = AutoTokenizer.from_pretrained(str(dst))
    else:
        tokenizer = internlm2_tokenizer(src)
        tokenizer.save_pretrained(str(dst))
    generation = GenerationConfig.from_pretrained(src) if (src / "generation_config.json").exists() else \
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    eos = generation.eos_token_id if generation.eos_token_id is not None else []
    eos = eos if isinstance(eos, list) else [eos]
    if tokenizer.chat_template:  # a chat model: its end-of-turn token must stop generation
        eos += [i for i in stop_token_ids(tokenizer) if i not in eos]
    generation.eos_token_id = eos + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in eos + [None] else [])
    generation.bos_token_id, generation.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    generation.save_pretrained(str(dst))
    # config.json names the tokenizer's special ids too: else the Trainer rewrites it before training, with a warning
    config = json.loads((dst / "config.json").read_text())
    config |= {key: getattr(tokenizer, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def convert_internlm2(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the Llama-layout copy of the InternLM2 checkpoint in `src` to `dst` (reused when up to date)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .fingerprint import folder_hashes

    src, dst = Path(src).resolve(), Path(dst)
    if not is_internlm2(src):
        raise ConversionError(f"{src}/config.json does not say model_type 'internlm2'; nothing to convert.")
    stamp = {"version": CONVERSION_VERSION, "source": str(src),
             "source_files": folder_hashes(src)}  # by content: a checkpoint swapped in place is converted anew
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
