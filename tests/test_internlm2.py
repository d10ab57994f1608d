"""InternLM2 -> Llama conversion, checked on a small synthetic checkpoint in the InternLM2 layout
against a reference forward pass written here from the InternLM2 architecture."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

from helpers.internlm2 import ConversionError, convert_internlm2, split_wqkv

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, THETA, EPS = 32, 4, 2, 2, 48, 1000000.0, 1e-5


def _internlm2_checkpoint(path, tokenizer_dir, seed=0):
    """Random weights in InternLM2's own names, fused wqkv, config and tokenizer pointing at remote code."""
    path.mkdir(parents=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, path / f.name)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg |= {"tokenizer_class": "InternLM2Tokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, ensure_ascii=False))
    vocab = len(json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]) + 16
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
              "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                           "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
              "vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_act": "silu",
              "max_position_embeddings": 256, "rms_norm_eps": EPS, "rope_theta": THETA, "bias": False,
              "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=0.2: torch.randn(*shape, generator=g) * scale  # noqa: E731
    head_dim = HIDDEN // HEADS
    w = {"model.tok_embeddings.weight": rnd(vocab, HIDDEN, scale=1.0), "model.norm.weight": 1 + rnd(HIDDEN),
         "output.weight": rnd(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "attention.wqkv.weight"] = rnd((HEADS + 2 * KV_HEADS) * head_dim, HIDDEN)
        w[p + "attention.wo.weight"] = rnd(HIDDEN, HIDDEN)
        w[p + "feed_forward.w1.weight"] = rnd(FFN, HIDDEN)
        w[p + "feed_forward.w3.weight"] = rnd(FFN, HIDDEN)
        w[p + "feed_forward.w2.weight"] = rnd(HIDDEN, FFN)
        w[p + "attention_norm.weight"] = 1 + rnd(HIDDEN)
        w[p + "ffn_norm.weight"] = 1 + rnd(HIDDEN)
    save_file(w, str(path / "model.safetensors"))
    return w


def _reference_logits(w, ids):
    """InternLM2's forward from its definition: fused wqkv laid out per kv group as [q..., k, v]."""
    w = {k: v.double() for k, v in w.items()}
    head_dim, group, T = HIDDEN // HEADS, HEADS // KV_HEADS, len(ids)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight

    inv = 1.0 / THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(t):  # (T, head_dim): rotate the two halves
        half = head_dim // 2
        return t * cos + torch.cat([-t[:, half:], t[:, :half]], -1) * sin

    x = w["model.tok_embeddings.weight"][torch.tensor(ids)]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "attention_norm.weight"])
        qkv = (h @ w[p + "attention.wqkv.weight"].T).reshape(T, KV_HEADS, group + 2, head_dim)
        outs = []
        for head in range(HEADS):
            kv, j = divmod(head, group)
            q, k, v = rope(qkv[:, kv, j]), rope(qkv[:, kv, group]), qkv[:, kv, group + 1]
            scores = q @ k.T / math.sqrt(head_dim)
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            outs.append(scores.softmax(-1) @ v)
        x = x + torch.cat(outs, -1) @ w[p + "attention.wo.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        gate, up = h @ w[p + "feed_forward.w1.weight"].T, h @ w[p + "feed_forward.w3.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["output.weight"].T


def test_split_wqkv_follows_the_group_layout():
    head_dim = 2
    rows = torch.arange((HEADS + 2 * KV_HEADS) * head_dim).float().unsqueeze(1)  # row i holds value i
    q, k, v = split_wqkv(rows, HEADS, KV_HEADS, head_dim)
    # group 0 = rows [q0 q1 k0 v0] = [0..1, 2..3, 4..5, 6..7]; group 1 = [8..9, 10..11, 12..13, 14..15]
    assert q.squeeze(1).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert k.squeeze(1).tolist() == [4, 5, 12, 13] and v.squeeze(1).tolist() == [6, 7, 14, 15]


def test_converted_model_matches_the_reference_forward(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "internlm2-chat-mini"
    weights = _internlm2_checkpoint(src, tiny_model_dir)
    dst = convert_internlm2(src, tmp_path / "converted")
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float64).eval()  # no trust_remote_code
    assert model.config.model_type == "llama"
    tok = AutoTokenizer.from_pretrained(dst)
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.chat_template == original.chat_template
    chat = [{"role": "user", "content": "你是谁"}]
    ids = list(tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert ids == list(original.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    expected = _reference_logits(weights, ids)
    # transformers computes the rotary angles in float32, hence 1e-5 rather than float64 round-off.
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert (expected - expected.mean(-1, keepdim=True)).abs().max() > 0.5  # logits that differ enough to tell
    assert convert_internlm2(src, tmp_path / "converted") == dst  # second call reuses the copy
    stamp = (dst / "model.safetensors").stat().st_mtime_ns
    assert convert_internlm2(src, tmp_path / "converted") == dst and (dst / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_checkpoint_swapped_in_place_at_the_same_size_is_converted_anew(tmp_path, tiny_model_dir):
    """Another checkpoint of the same dimensions in the same folder (a base changed in place): the converted copy
    follows the source's content, not its path and file sizes."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "internlm2-chat-mini"
    _internlm2_checkpoint(src, tiny_model_dir)
    dst = convert_internlm2(src, tmp_path / "converted")
    before = load_file(str(dst / "model.safetensors"))
    for f in src.glob("*.safetensors"):
        tensors = load_file(str(f))
        save_file({k: v + 0.25 if v.is_floating_point() else v for k, v in tensors.items()}, str(f),
                  metadata={"format": "pt"})
    after = load_file(str(convert_internlm2(src, tmp_path / "converted") / "model.safetensors"))
    assert not torch.equal(before["model.norm.weight"], after["model.norm.weight"])


def test_prepare_base_model_converts_internlm2_once(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from helpers.base_model import base_model_path, prepare_base_model
    from helpers.paths import work

    src = tmp_path / "internlm2-chat-mini"
    _internlm2_checkpoint(src, tiny_model_dir)
    w = work(tmp_path / "w")
    path = prepare_base_model(str(src), w)
    record = json.loads((w.model / "course_model.json").read_text())
    assert record["path"] == str(src.resolve()) and record["converted"] == str(path)
    assert base_model_path(w) == str(path)
    assert AutoModelForCausalLM.from_pretrained(path).config.architectures == ["LlamaForCausalLM"]


def test_unknown_tensor_is_one_sentence(tmp_path, tiny_model_dir):
    src = tmp_path / "odd"
    weights = _internlm2_checkpoint(src, tiny_model_dir)
    weights["model.vision_tower.weight"] = torch.zeros(2)
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="'model.vision_tower.weight' is not part of the InternLM2 layout"):
        convert_internlm2(src, tmp_path / "converted")
