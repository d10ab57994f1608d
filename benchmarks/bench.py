"""Side-by-side training benchmark: the plain QLoRA recipe, Liger, Unsloth and the kit's fast path.

One run builds a Llama with internlm2-chat-1.8b dimensions and random weights (no download), then runs
each recipe in its own process (Unsloth and Liger patch transformers globally) at the same shapes and
prints markdown tables: tokens/s, step time, peak memory, MFU; the whole homework end to end; the
kit's loss against the plain recipe's on the same batch; a kernel profile of the kit's step.

    python benchmarks/bench.py                 # on the GPU (about 8 minutes on an H200)
    python benchmarks/bench.py --tiny          # tiny dims on a CPU: checks the code, times nothing useful
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = 790.0  # measured bf16 matmul rate of the H200 (8192^3, random data)
REAL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=8, vocab_size=92544, max_position_embeddings=32768, tie_word_embeddings=False,
            rms_norm_eps=1e-5, rope_theta=1e6)
TINY = dict(REAL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2000)
LORA = dict(r=64, lora_alpha=16, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
# (label, rows, tokens per row, packed)
SHAPES = [("1 × 48", 1, 48, False), ("2 × 48", 2, 48, False), ("1 × 2048 packed", 1, 2048, True),
          ("4 × 2048 packed", 4, 2048, True), ("8 × 2048 packed", 8, 2048, True)]
TINY_SHAPES = [("1 × 48", 1, 48, False), ("2 × 48", 2, 48, False), ("1 × 256 packed", 1, 256, True),
               ("2 × 256 packed", 2, 256, True)]
RECIPES = ["kit", "unsloth", "kit-4bit", "plain", "liger"]
HOMEWORK_SAMPLES, HOMEWORK_EPOCHS = 10_001, 2


# ---------------------------------------------------------------- data: course-like samples
def course_samples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Samples shaped like the homework's (~48 tokens, the answer is the last ~55%), random token ids."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(44, 52)
        answer = int(length * 0.55)
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * (length - answer) + ids[length - answer:]})
    return out


def rows_for(shape, samples):
    """Peers' batch: padded single samples (unpacked) or rows of concatenated samples (classic packing)."""
    _, rows, length, packed = shape
    it = iter(samples)
    batch = []
    for _ in range(rows):
        if not packed:
            batch.append([next(it)])
            continue
        row, used = [], 0
        while True:
            s = next(it)
            if used + len(s["input_ids"]) > length:
                break
            row.append(s)
            used += len(s["input_ids"])
        batch.append(row)
    return batch


# ---------------------------------------------------------------- workers (one recipe per process)
def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib():
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def _reset_peak():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peer_batch(rows, length, packed, device):
    """Padded (B, L) tensors with HF's labels; packed rows attend across samples (classic packing)."""
    import torch

    width = length if packed else max(sum(len(s["input_ids"]) for s in r) for r in rows)
    ids, labels, mask = [], [], []
    for r in rows:
        i = [t for s in r for t in s["input_ids"]]
        lab = [t for s in r for t in s["labels"]]
        pad = width - len(i)
        ids.append(i + [0] * pad)
        labels.append(lab + [-100] * pad)
        mask.append([1] * len(i) + [0] * pad)
    t = lambda x: torch.tensor(x, device=device)  # noqa: E731
    return {"input_ids": t(ids), "labels": t(labels), "attention_mask": t(mask)}


def load_peer(recipe, model_dir, tiny):
    import torch

    cuda = torch.cuda.is_available()
    if recipe == "unsloth":
        if not cuda:
            raise RuntimeError("Unsloth needs a CUDA GPU")
        import unsloth  # noqa: F401  (must come before transformers)
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=2048, dtype=torch.bfloat16,
                                                     load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, bias="none", use_gradient_checkpointing="unsloth",
                                                 random_state=0, **LORA)
        return model, "4-bit NF4, Unsloth kernels, offloaded checkpointing"
    if recipe == "liger":
        if not cuda:
            raise RuntimeError("Liger kernels need a CUDA GPU (Triton)")
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"attn_implementation": "sdpa"}
    if cuda:
        kwargs.update(dtype=torch.bfloat16, device_map={"": 0}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if cuda:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    model.train()
    return model, "4-bit NF4, SDPA, checkpointing" if cuda else "fp32 on CPU (no 4-bit without CUDA)"


def kit_plan(recipe):
    from helpers import fast_path as fp

    plan = fp.make_plan("lean" if recipe == "kit-4bit" else "auto")
    if recipe == "kit-liger-ce":
        plan.loss = "liger"
    if recipe == "kit-liger":  # the 16-bit plan with Liger's kernels instead of compiled layers
        plan.compile_layers, plan.kernels = False, "liger"
    if recipe == "kit-torch":  # neither
        plan.compile_layers, plan.kernels = False, "torch"
    return plan


def time_steps(step, warmup, steps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        loss = step()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), loss


def worker(recipe, model_dir, tiny, out_path, homework):
    import torch

    from helpers import fast_path as fp

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TINY if tiny else REAL
    shapes = TINY_SHAPES if tiny else SHAPES
    emit = lambda rec: open(out_path, "a").write(json.dumps({"recipe": recipe, **rec}) + "\n")  # noqa: E731
    t0 = time.perf_counter()
    kit = recipe.startswith("kit")
    if kit:
        plan = kit_plan(recipe)
        if tiny:
            plan.tokens_per_step, plan.accumulation = 512, 1
        model = fp.load_for_training(model_dir, plan, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"])
        what = f"{plan.precision}, {'checkpointing' if plan.gradient_checkpointing else 'no recomputation'}, " \
               f"{plan.attention} attention, {plan.loss} CE, {plan.kernels} kernels" + (", compiled layers" if plan.compile_layers else "")
        opt = fp.optimizer_for(model, plan)
    else:
        plan = None
        model, what = load_peer(recipe, model_dir, tiny)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=device == "cuda")
    emit({"kind": "setup", "what": what, "load_s": time.perf_counter() - t0,
          "plan": plan.as_dict() if plan else None, "versions": versions()})
    samples = course_samples(4000, cfg["vocab_size"], seed=1)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def make_step(shape):
        rows = rows_for(shape, samples)
        if kit:
            flat = [s for r in rows for s in r]
            batch = fp.collate_packed(flat, device=device)
            step = lambda: fp.train_step(model, opt, [batch], plan)  # noqa: E731
        else:
            batch = peer_batch(rows, shape[2], shape[3], device)

            def step():
                with autocast:
                    loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return float(loss.detach())
        lengths = [len(s["input_ids"]) for r in rows for s in r]
        return step, lengths

    for shape in shapes:
        if recipe == "liger" and not shape[3]:
            continue  # Liger's gains are in long packed rows; the issue's table leaves these out
        try:
            step, lengths = make_step(shape)
            _reset_peak()
            small = not shape[3]
            sec, loss = time_steps(step, 3 if small else 2, 10 if small else 5)
            tokens = sum(lengths)
            flops = fp.flops_per_token(_Cfg(cfg), fp.mean_causal_context(lengths))
            emit({"kind": "shape", "shape": shape[0], "tokens": tokens, "step_s": sec, "tok_s": tokens / sec,
                  "peak_gib": _peak_gib(), "mfu": flops * tokens / sec / (PEAK_TFLOPS * 1e12), "loss": loss})
        except Exception as e:  # one shape's failure (out of memory, unsupported) must not hide the others
            emit({"kind": "shape", "shape": shape[0], "error": f"{type(e).__name__}: {str(e)[:300]}"})
            traceback.print_exc()
            _reset_peak()
    if kit:
        emit({"kind": "loss_check", **loss_check(model, plan, samples[:8], device)})
        if homework:
            emit({"kind": "homework", **kit_homework(model, opt, plan, cfg, tiny, device)})
        if recipe == "kit" and device == "cuda" and os.environ.get("BENCH_PROFILE", "1") == "1":
            emit({"kind": "profile", "table": profile(model, opt, plan, samples, device)})


class _Cfg:
    def __init__(self, d):
        self.__dict__.update(d)


def loss_check(model, plan, samples, device):
    """Same weights, same 8 samples: HF's own padded SDPA forward and loss vs the kit's packed fused loss."""
    import torch

    from helpers import fast_path as fp

    lm = fp.causal_lm(model)
    batch = peer_batch([[s] for s in samples], 0, False, device)
    with torch.no_grad():
        lm.set_attn_implementation("sdpa")
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            plain = float(lm(**batch).loss)
        fp.use_kit_attention(model)
        kit = float(fp.packed_loss(model, fp.collate_packed(samples, device=device), plan))
    return {"plain": plain, "kit": kit, "rel_diff": abs(kit - plain) / abs(plain),
            "varlen": fp._VARLEN["ok"] and device == "cuda", "varlen_note": fp._VARLEN["why"]}


def kit_homework(model, opt, plan, cfg, tiny, device):
    """The whole homework: pack 10,001 course-like samples, 2 epochs of optimizer steps, timed end to end."""
    from helpers import fast_path as fp

    n = 200 if tiny else HOMEWORK_SAMPLES
    samples = course_samples(n, cfg["vocab_size"], seed=7)
    _sync()
    t0 = time.perf_counter()
    losses, steps = [], 0
    for micro in fp.packed_steps(samples, plan, epochs=HOMEWORK_EPOCHS, device=device):
        losses.append(fp.train_step(model, opt, micro, plan))
        steps += 1
    _sync()
    seconds = time.perf_counter() - t0
    tokens = HOMEWORK_EPOCHS * sum(len(s["input_ids"]) for s in samples)
    return {"seconds": seconds, "steps": steps, "tokens": tokens, "tok_s": tokens / seconds,
            "loss_first": losses[0], "loss_last": losses[-1], "peak_gib": _peak_gib()}


def profile(model, opt, plan, samples, device, top=18):
    """CUDA kernel time of two kit steps, by kernel (what the rest of the time goes to)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as prof

    from helpers import fast_path as fp

    rows = fp.pack_examples(samples, plan.tokens_per_step, seed=3)
    batch = fp.collate_packed(rows[0], pad_to=plan.tokens_per_step, device=device)
    fp.train_step(model, opt, [batch], plan)
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(2):
            fp.train_step(model, opt, [batch], plan)
        torch.cuda.synchronize()
    for key in ("device_time_total", "cuda_time_total"):
        try:
            return p.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)
        except Exception:
            continue
    return "profile table unavailable"


def versions():
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "liger-kernel", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    except Exception:
        pass
    return out


# ---------------------------------------------------------------- orchestrator
def build_model(model_dir: Path, tiny: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers.tiny_model import build_tokenizer

    if (model_dir / "config.json").exists():
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**(TINY if tiny else REAL))).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    del model


def homework_rows(results):
    """Homework time per recipe: measured end to end for the kit, projected from timed steps for the peers."""
    tokens = HOMEWORK_EPOCHS * HOMEWORK_SAMPLES * 48
    rows = []
    for recipe, recs in results.items():
        shapes = {r["shape"]: r for r in recs if r.get("kind") == "shape" and "tok_s" in r}
        if recipe.startswith("kit"):
            hw = next((r for r in recs if r.get("kind") == "homework"), None)
            if hw:
                rows.append((recipe, "packed, plan's tokens per step", hw["seconds"], "measured", hw))
            continue
        for label, how in (("1 × 48", "batch 1, unpacked"), ("2 × 48", "batch 2, unpacked")):
            if label in shapes:
                rows.append((recipe, how, tokens / shapes[label]["tok_s"], "projected", None))
        packed = [r for k, r in shapes.items() if "packed" in k]
        if packed:
            best = max(packed, key=lambda r: r["tok_s"])
            rows.append((recipe, f"packed {best['shape'].replace(' packed', '')}", tokens / best["tok_s"],
                         "projected", None))
    return rows


def print_tables(results, out_dir):
    lines = []
    setups = {k: next((r for r in v if r.get("kind") == "setup"), {}) for k, v in results.items()}
    vers = next((s["versions"] for s in setups.values() if s.get("versions")), {})
    lines.append(f"date: {time.strftime('%Y-%m-%d %H:%M')}; " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    lines.append("")
    lines.append("| recipe | what | load s |")
    lines.append("|---|---|---|")
    for k, s in setups.items():
        lines.append(f"| {k} | {s.get('what', '—')} | {s.get('load_s', 0):.0f} |")
    for k, v in results.items():
        for r in v:
            if r.get("kind") == "failed":
                lines.append(f"| {k} | skipped: {r['error']} | |")
    lines.append("")
    lines.append("| shape | " + " | ".join(f"{k} tok/s (peak GiB, MFU)" for k in results) + " |")
    lines.append("|---|" + "---|" * len(results))
    labels = [s[0] for s in SHAPES] + [s[0] for s in TINY_SHAPES if s[0] not in [x[0] for x in SHAPES]]
    for label in labels:
        cells = []
        for k, v in results.items():
            r = next((r for r in v if r.get("kind") == "shape" and r["shape"] == label), None)
            if r is None:
                cells.append("–")
            elif "error" in r:
                cells.append(f"error: {r['error'][:60]}")
            else:
                cells.append(f"{r['tok_s']:,.0f} ({r['peak_gib']:.1f}, {100 * r['mfu']:.1f}%) {1000 * r['step_s']:.0f} ms")
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| homework (10,001 × ~48 tokens, 2 epochs) | how | seconds | |")
    lines.append("|---|---|---|---|")
    for recipe, how, sec, kind, hw in homework_rows(results):
        extra = f", {hw['steps']} steps, {hw['tok_s']:,.0f} tok/s, peak {hw['peak_gib']:.1f} GiB, loss {hw['loss_first']:.2f} → {hw['loss_last']:.2f}" if hw else ""
        lines.append(f"| {recipe} | {how} | {sec:,.1f} | {kind}{extra} |")
    lines.append("")
    for k, v in results.items():
        for r in v:
            if r.get("kind") == "loss_check":
                lines.append(f"loss check ({k}): plain {r['plain']:.4f}, kit {r['kit']:.4f}, relative difference {r['rel_diff']:.2e}; varlen attention: {r.get('varlen')} {r.get('varlen_note', '')}")
    text = "\n".join(lines)
    print(text)
    (out_dir / "tables.md").write_text(text + "\n")
    for k, v in results.items():
        for r in v:
            if r.get("kind") == "profile":
                (out_dir / f"profile_{k}.txt").write_text(r["table"])
                print(f"\nprofile ({k}):\n" + "\n".join(r["table"].splitlines()[:24]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny dims (CPU check)")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma list of " + ", ".join(RECIPES + ["kit-liger", "kit-torch", "kit-liger-ce"]))
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="folder for results")
    ap.add_argument("--model-dir", default=None, help="where the random-weight model is built (default: tmp)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per recipe")
    ap.add_argument("--no-homework", action="store_true")
    ap.add_argument("--deadline", type=int, default=0, help="stop starting recipes after this many seconds (0: none)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir or f"/tmp/kit-bench-{'tiny' if args.tiny else 'real'}")
    if args.worker:
        worker(args.worker, model_dir, args.tiny, out / f"{args.worker}.jsonl", not args.no_homework)
        return 0
    t0 = time.perf_counter()
    build_model(model_dir, args.tiny)
    print(f"model built in {time.perf_counter() - t0:.0f} s: {model_dir}", flush=True)
    results = {}
    for recipe in [r for r in args.recipes.split(",") if r]:
        path = out / f"{recipe}.jsonl"
        path.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", recipe, "--out", str(out), "--model-dir", str(model_dir)]
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--no-homework"] if args.no_homework else []
        t1 = time.perf_counter()
        limit = args.timeout
        if args.deadline:
            limit = int(min(limit, args.deadline - (t1 - t0)))
            if limit < 30:
                results[recipe] = [{"kind": "failed", "error": "not run: the run's time limit was reached"}]
                continue
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            err = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            (out / f"{recipe}.log").write_text(proc.stdout + proc.stderr)
        except subprocess.TimeoutExpired:
            err = f"timed out after {limit} s"
        recs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        if err:
            recs.append({"kind": "failed", "error": err})
        results[recipe] = recs
        print(f"{recipe}: {time.perf_counter() - t1:.0f} s" + (f" — {err}" if err else ""), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))  # partial results survive a time limit
        for r in recs:
            if r.get("kind") in ("shape", "homework", "loss_check"):
                print("   ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "recipe"}, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
