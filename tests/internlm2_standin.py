"""Stand-ins for the real InternLM2 repositories: the real tokenizer.model (tests/fixtures/internlm2), config
files as the chat repositories ship them (remote code in auto_map), and tiny random weights in InternLM2's own
tensor layout. Only the dimensions are small; names, ids, files and formats are the real ones."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "internlm2" / "tokenizer.model"
VOCAB = 92544
SPECIAL = {92538: "<|plugin|>", 92539: "<|interpreter|>", 92540: "<|action_end|>", 92541: "<|action_start|>",
           92542: "<|im_end|>", 92543: "<|im_start|>"}
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")
# The family: head / KV-head counts and rope settings as the real configs have them, other sizes scaled down.
FAMILY = {
    "internlm2-chat-1_8b": dict(num_attention_heads=16, num_key_value_heads=8, rope_theta=1000000,
                                rope_scaling=None, max_position_embeddings=32768),
    "internlm2-chat-7b": dict(num_attention_heads=32, num_key_value_heads=8, rope_theta=1000000,
                              rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=32768),
    "internlm2-chat-20b": dict(num_attention_heads=48, num_key_value_heads=8, rope_theta=1000000,
                               rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=32768),
    "internlm2_5-7b-chat": dict(num_attention_heads=32, num_key_value_heads=8, rope_theta=1000000,
                                rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=32768),
}


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def tokenizer_config() -> dict:
    """tokenizer_config.json as internlm2-chat-1_8b ships it."""
    decoder = {"0": _special("<unk>"), "1": _special("<s>"), "2": _special("</s>")}
    decoder |= {str(i): _special(t) for i, t in SPECIAL.items()}
    return {"added_tokens_decoder": decoder,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                          "<|interpreter|>", "<|plugin|>"],
            "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                           "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
            "bos_token": "<s>", "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
            "decode_with_prefix_space": False, "eos_token": "</s>", "model_max_length": 1000000000000000019884624838656,
            "pad_token": "</s>", "sp_model_kwargs": None, "tokenizer_class": "InternLM2Tokenizer",
            "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}


def model_config(family: str, hidden: int, layers: int, intermediate: int) -> dict:
    return {"architectures": ["InternLM2ForCausalLM"], "attn_implementation": "eager",
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
                         "AutoModel": "modeling_internlm2.InternLM2ForCausalLM"},
            "bias": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": hidden,
            "initializer_range": 0.02, "intermediate_size": intermediate, "model_type": "internlm2",
            "num_hidden_layers": layers, "pad_token_id": 2, "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "transformers_version": "4.41.0", "use_cache": True, "vocab_size": VOCAB,
            **FAMILY[family]}


def build_standin(path: Path, family: str = "internlm2-chat-1_8b", hidden: int | None = None, layers: int = 2,
                  intermediate: int = 96, seed: int = 0) -> dict:
    """Write the stand-in repository to `path`; returns its weights (InternLM2 names, bfloat16 as the real ones)."""
    import torch
    from safetensors.torch import save_file

    cfg = model_config(family, hidden or 4 * FAMILY[family]["num_attention_heads"], layers, intermediate)
    path.mkdir(parents=True)
    shutil.copy2(FIXTURE, path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
         "additional_special_tokens": tokenizer_config()["additional_special_tokens"]}, indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, 92542], "pad_token_id": 2, "transformers_version": "4.41.0"}))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py",
                 "tokenization_internlm2_fast.py"):  # remote code that must never run: it would raise
        (path / name).write_text("raise RuntimeError('remote code was executed')\n")
    g = torch.Generator().manual_seed(seed)
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = hidden // heads

    def rnd(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    # Every token's state keeps a shared direction `up`, and <|im_end|>'s output row points along it: the model ends
    # its turn as soon as it may, as a chat model does, so answers are short and generation must stop at 92542.
    up = torch.randn(hidden, generator=g)
    up = up / up.norm()
    w = {"model.tok_embeddings.weight": (4 * up + rnd(VOCAB, hidden, scale=0.1).float()).to(torch.bfloat16),
         "model.norm.weight": 1 + rnd(hidden), "output.weight": rnd(VOCAB, hidden, scale=0.05)}
    w["output.weight"][92542] = up.to(torch.bfloat16)
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "attention.wqkv.weight"] = rnd((heads + 2 * kv) * head_dim, hidden)
        w[p + "attention.wo.weight"] = rnd(hidden, heads * head_dim, scale=0.02)
        w[p + "feed_forward.w1.weight"] = rnd(intermediate, hidden)
        w[p + "feed_forward.w3.weight"] = rnd(intermediate, hidden)
        w[p + "feed_forward.w2.weight"] = rnd(hidden, intermediate, scale=0.02)
        w[p + "attention_norm.weight"] = 1 + rnd(hidden)
        w[p + "ffn_norm.weight"] = 1 + rnd(hidden)
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    return w
