"""Stage-2 VLM fine-tune at real dimensions, random weights: peak memory and step time.

LLaVA = CLIP ViT-L/14 at 336 px + 2-layer GELU projector + a Llama-layout LLM of internlm2-chat-1.8b's size
(hidden 2048, 24 layers, 16 heads, 8 kv heads, FFN 8192, vocab 92544). The LLM is loaded in 4-bit NF4 with
double quantisation (when CUDA + bitsandbytes are there), LoRA r=64 on its linear layers and on the vision
tower's, the projector trained in full, gradient checkpointing on: the course's stage-2 recipe.
Nothing is downloaded. Run from the repository root:

    python benchmarks/gpu_vlm_real_dims.py            # real dimensions (a GPU)
    python benchmarks/gpu_vlm_real_dims.py --small    # tiny dimensions, a quick check on a CPU
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REAL = dict(
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, projection_dim=768),
    text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
              num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768, rope_theta=1000000.0),
    text_tokens=1024, lora_r=64, lora_alpha=16, lora_dropout=0.1,
)
SMALL = dict(
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                image_size=32, patch_size=8, projection_dim=32),
    text=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=2000, max_position_embeddings=2048, rope_theta=10000.0),
    text_tokens=64, lora_r=8, lora_alpha=16, lora_dropout=0.0,
)


def build_random_llava(dims: dict, out_dir: Path, dtype) -> Path:
    """A LLaVA with random weights at `dims`, saved so it can be reloaded with 4-bit quantization."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(**dims["text"], bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    vision = CLIPVisionConfig(**dims["vision"])
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_index=dims["text"]["vocab_size"] - 1, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(vision.image_size // vision.patch_size) ** 2)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(config).to(dtype)
    model.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny dimensions (a CPU check of the script)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 8; --small 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-4bit", action="store_true", help="keep the LLM in 16-bit (for comparison)")
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlavaForConditionalGeneration

    from helpers.vlm_train import FULLY_TRAINED, NOT_QUANTIZED, lora_target_pattern, trainable_summary

    dims = SMALL if args.small else REAL
    steps = args.steps or (3 if args.small else 8)
    cuda = torch.cuda.is_available()
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    four_bit = cuda and bnb and not args.no_4bit
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    print(f"device={device} ({torch.cuda.get_device_name() if cuda else 'cpu'}), 4-bit={four_bit}, dtype={dtype}",
          flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = build_random_llava(dims, Path(tmp) / "llava", dtype)
        build_s = time.perf_counter() - t0
        kwargs = {"dtype": dtype}
        if four_bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=NOT_QUANTIZED)
            kwargs["device_map"] = {"": 0}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    if not four_bit:
        model.to(device)
    model.config.use_cache = False
    if four_bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=dims["lora_r"], lora_alpha=dims["lora_alpha"], lora_dropout=dims["lora_dropout"],
                      target_modules=lora_target_pattern(vision_lora=True), modules_to_save=FULLY_TRAINED["homework"])
    model = get_peft_model(model, lora)
    params = trainable_summary(model)
    load_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    cfg = model.config
    v = cfg.vision_config
    n_image = (v.image_size // v.patch_size) ** 2
    b, n_text = args.batch_size, dims["text_tokens"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.text_config.vocab_size - 2, (b, n_text + n_image), generator=g)
    ids[:, 1:1 + n_image] = cfg.image_token_index  # the picture right after BOS, as in a first user turn
    labels = ids.clone()
    labels[:, : 1 + n_image + n_text // 2] = -100  # loss on the answer half only
    batch = {"input_ids": ids.to(device), "labels": labels.to(device),
             "attention_mask": torch.ones_like(ids).to(device),
             "pixel_values": torch.randn(b, 3, v.image_size, v.image_size, generator=g).to(device, dtype)}
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    model.train()
    times, losses = [], []
    for step in range(args.warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(round(loss.item(), 4))
    report = {
        "dims": "small" if args.small else "real (internlm2-chat-1.8b size LLM + CLIP ViT-L/14-336)",
        "device": torch.cuda.get_device_name() if cuda else "cpu", "llm_4bit": four_bit, "compute_dtype": str(dtype),
        "batch_size": b, "sequence_tokens": n_text + n_image, "image_tokens": n_image,
        "trainable_parameters": params, "build_seconds": round(build_s, 1),
        "step_seconds_mean": round(sum(times) / len(times), 4), "step_seconds_min": round(min(times), 4),
        "losses": losses,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "memory_after_load_gib": round(load_memory, 2) if cuda else None,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
