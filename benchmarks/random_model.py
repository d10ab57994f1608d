"""The benchmarks' base model: a Llama at internlm2-chat-1.8b dimensions with random weights (nothing is
downloaded), or a tiny one for CPU dry runs, with the kit's own tokenizer and chat-template stop ids."""
from __future__ import annotations

from pathlib import Path

# hidden 2048, 24 layers, 16 heads / 8 key-value heads, FFN 8192, vocab 92,544, untied output layer
REAL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768, tie_word_embeddings=False,
            rms_norm_eps=1e-5, rope_theta=1e6)
TINY = dict(REAL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2000)


def build_model(model_dir: Path, tiny: bool = False) -> Path:
    """Build (once) and save the model: bf16 at the real dims (made on the GPU when there is one), float32 tiny."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from helpers.template import END_OF_TURN
    from helpers.tiny_model import build_tokenizer

    model_dir = Path(model_dir)
    if (model_dir / "config.json").exists():
        return model_dir
    torch.manual_seed(0)
    tok = build_tokenizer()  # the kit's own tokenizer: its ids are a subset of the vocabulary
    stop = tok.convert_tokens_to_ids(END_OF_TURN)
    dims = dict(TINY if tiny else REAL)
    dims["vocab_size"] = max(dims["vocab_size"], len(tok))
    ids = dict(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**dims, **ids, eos_token_id=[tok.eos_token_id, stop]))
    model = model.to(torch.float32 if tiny else torch.bfloat16)
    model.generation_config = GenerationConfig(**ids, eos_token_id=[stop, tok.eos_token_id])
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return model_dir
