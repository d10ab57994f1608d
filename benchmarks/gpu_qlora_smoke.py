"""Smoke run of the kit's training path (helpers.train.train, notebook 02's) on a GPU: 4-bit NF4 or "auto".

Offline and self-contained: builds a random-weight Llama with the kit's own tokenizer in a temp dir,
writes the self-cognition data there, trains ~50 updates and prints first/last loss, peak memory and
tokens/s (as JSON on the last line). On a CPU: `--quantization none --size tiny`.

    python benchmarks/gpu_qlora_smoke.py                      # H200: nf4, a ~0.3B model, packed 1024
    python benchmarks/gpu_qlora_smoke.py --quantization auto  # H200: the 16-bit fast path notebook 02 gets
    python benchmarks/gpu_qlora_smoke.py --quantization none --size tiny --steps 20   # CPU check
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = {  # random-weight Llama shapes: "small" is big enough for the GPU to matter, "tiny" runs on a CPU
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                  num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


def build_random_llama(out_dir: Path, size: str, seed: int = 0) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from helpers.template import END_OF_TURN
    from helpers.tiny_model import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    stop = tok.convert_tokens_to_ids(END_OF_TURN)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, stop],
                         pad_token_id=tok.pad_token_id, max_position_embeddings=4096, tie_word_embeddings=False,
                         **SIZES[size])
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[stop, tok.eos_token_id], pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantization", default="nf4", choices=["nf4", "none", "auto"])
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--grad-acc", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--keep", default=None, help="keep the work dir here instead of a temp dir")
    args = p.parse_args(argv)

    import torch
    import transformers

    from helpers.data import make_dataset
    from helpers.paths import work as make_work
    from helpers.train import TrainConfig, read_metrics, train

    tmp = Path(args.keep or tempfile.mkdtemp(prefix="qlora-smoke-"))
    w = make_work(tmp / "work")
    t0 = time.perf_counter()
    model_dir = build_random_llama(tmp / "random-llama", args.size)
    make_dataset(w.dataset, repeats=1000, general_ratio=0.2)
    config = TrainConfig(preset="homework", base_model=str(model_dir), quantization=args.quantization,
                         max_steps=args.steps, max_length=args.max_length, gradient_accumulation=args.grad_acc,
                         lr=args.lr, lora_dropout=0.0, gradient_checkpointing=args.gradient_checkpointing,
                         evaluation_freq=max(1, args.steps // 2), save_steps=max(1, args.steps // 2),
                         logging_steps=1, max_new_tokens=32, resume=False)
    result = train(config, w)
    metrics = read_metrics(w)
    speeds = [m["tokens_per_s"] for m in metrics[1:]] or [0.0]
    summary = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "bitsandbytes": _version("bitsandbytes"), "size": args.size, "quantization": result["quantization"],
        "plan": (result.get("plan") or {}).get("layers"),
        "steps": result["steps"], "first_loss": result["first_loss"], "last_loss": result["final_loss"],
        "peak_memory_mb": result["peak_memory_mb"], "tokens_per_s_median": statistics.median(speeds),
        "train_seconds": result["train_seconds"], "total_seconds": round(time.perf_counter() - t0, 1),
        "trainable_parameters": result["trainable_parameters"],
        "answers_after": result["answers_after"], "adapter_files": sorted(f.name for f in w.adapter.iterdir()),
    }
    print(json.dumps(summary, ensure_ascii=False))
    ok = result["final_loss"] < result["first_loss"] and (w.adapter / "adapter_model.safetensors").exists()
    return 0 if ok else 1


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
