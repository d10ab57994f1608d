"""Side-by-side training benchmark: the plain QLoRA recipe, Liger, Unsloth and the kit (notebook 02's path).

One run builds a Llama with internlm2-chat-1.8b dimensions and random weights (no download), then runs
each recipe in its own process (Unsloth and Liger patch transformers globally) at the same shapes and
prints markdown tables: tokens/s, step time, peak memory, MFU; the homework as the student runs it.
The kit's recipes are `helpers.train.train` from a `TrainConfig` (the notebook's own path, one code path):
`kit` (quantization "auto"), `kit-4bit` ("nf4"); each packed shape is a few updates of train() at that many
tokens per update (a kernel profile of the 8 × 2048 one); `homework-<quantization>[@<GiB>]` is the whole
homework preset, the process capped to GiB of GPU memory (a smaller card), timed from the start of train()
(load, quantization, compilation included) to the saved adapter, next to the training time alone.

    python benchmarks/bench.py                 # on the GPU
    python benchmarks/bench.py --recipes homework-auto,homework-nf4,homework-auto@24,homework-nf4@8
    python benchmarks/bench.py --tiny --recipes plain,kit,homework-auto   # tiny dims on a CPU: checks the code
"""
from __future__ import annotations

import argparse
import json
import math
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from random_model import REAL, TINY, build_model  # noqa: E402

PEAK_TFLOPS = 790.0  # measured bf16 matmul rate of the H200 (8192^3, random data)
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


def kit_train(model_dir, work_dir, quantization="auto", rows=16, length=1024, steps=-1, repeats=10_000,
              callbacks=None, **overrides):
    """The kit's recipe: notebook 02's own `helpers.train.train` from a TrainConfig, on notebook 01's data
    (`repeats` samples, general mix 0.2). steps > 0: `rows` packed rows of `length` per update for `steps`
    updates (a shape); steps = -1: the homework preset as a student runs it (2 epochs, 16 rows of 1024)."""
    import helpers.train as kit
    from helpers.data import make_dataset
    from helpers.paths import work as make_work

    w = make_work(work_dir)
    if not w.dataset.exists():
        make_dataset(w.dataset, repeats=repeats, general_ratio=0.2)
    knobs = dict(preset="homework", base_model=str(model_dir), quantization=quantization, resume=False,
                 logging_steps=1)  # a metrics row per update (tokens/s, grad norm); one sync per update
    if steps > 0:
        knobs.update(max_length=length, batch_size=rows, gradient_accumulation=1, max_steps=steps, lora_dropout=0.0,
                     evaluation_freq=10**6, save_steps=10**6, max_new_tokens=8)
    knobs.update(overrides)
    return kit.train(kit.TrainConfig(**knobs), w, callbacks=callbacks), kit.read_metrics(w)


SHAPE_UPDATES = 12  # per shape: 2 to warm up, 8 timed, 2 profiled


class _Profile:
    """A TrainerCallback (made lazily) that profiles updates first+1 .. last: CUDA kernel time by kernel and the
    share of wall time the GPU was busy."""

    def __new__(cls, first, last, top=18):
        from transformers import TrainerCallback

        class Profile(TrainerCallback):
            table, busy = "", None

            def on_step_begin(self, args, state, control, **kw):
                import torch

                if state.global_step == first:
                    torch.cuda.synchronize()
                    self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                   torch.profiler.ProfilerActivity.CUDA])
                    self.prof.__enter__()
                    self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                import torch

                if state.global_step == last and hasattr(self, "prof"):
                    torch.cuda.synchronize()
                    wall = time.perf_counter() - self.t0
                    self.prof.__exit__(None, None, None)
                    events = self.prof.key_averages()
                    kernels = sum(e.self_device_time_total for e in events  # GPU kernels only, no op counted twice
                                  if str(getattr(e, "device_type", "")).endswith("CUDA")) / 1e6
                    self.busy = kernels / wall
                    self.table = events.table(sort_by="self_device_time_total", row_limit=top,
                                              max_name_column_width=60)

        return Profile()


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


def _cap_memory(gib):
    import torch

    if gib and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / torch.cuda.get_device_properties(0).total_memory))


def _free(result):
    import gc

    import torch

    result.pop("model", None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def homework_worker(recipe, model_dir, tiny, emit, out_dir):
    """'homework-<quantization>[@<GiB>]': the whole homework through train(), the process capped to GiB."""
    spec = recipe.split("-", 1)[1]
    quantization, _, cap = spec.partition("@")
    _cap_memory(float(cap) if cap else 0)
    extra = dict(max_length=256, max_new_tokens=8) if tiny else {}
    t0 = time.perf_counter()
    result, metrics = kit_train(model_dir, out_dir / f"work-{recipe}", quantization, repeats=300 if tiny else 10_000,
                                **extra)
    wall = time.perf_counter() - t0
    norms = [m["grad_norm"] for m in metrics if m.get("grad_norm") is not None]
    speeds = [m["tokens_per_s"] for m in metrics[2:]] or [m["tokens_per_s"] for m in metrics]
    emit({"kind": "homework", "quantization": quantization, "cap_gib": float(cap) if cap else None,
          "picked": _plan_line(result), "updates": result["steps"],
          "tok_s": statistics.median(speeds) if speeds else 0.0, "peak_gib": result["peak_memory_mb"] / 1024,
          "loss_first": result["first_loss"], "loss_last": result["final_loss"],
          "grad_norm_finite": all(math.isfinite(n) for n in norms), "grad_norm_max": max(norms) if norms else None,
          "train_s": result["train_seconds"], "wall_s": result.get("wall_seconds"), "call_s": wall,
          "answers_after": result["answers_after"], "versions": versions()})
    _free(result)


def _plan_line(result: dict) -> str:
    """The run's plan in one line (what the kit picked for this card), from its training record."""
    plan = result.get("plan") or {}
    return ", ".join(f"{k} {plan.get(k)}" for k in ("weights", "layers", "rows_per_forward", "accumulation",
                                                     "recomputation")) or str(result.get("quantization"))


def kit_worker(recipe, model_dir, tiny, emit, out_dir, homework):
    """The kit's rows: each packed shape is notebook 02's train() for a few updates at that many tokens per update."""
    from helpers.train import plan as fp

    quantization = "nf4" if recipe == "kit-4bit" else "auto"
    cfg = TINY if tiny else REAL
    rows_wanted = [int(r) for r in os.environ.get("BENCH_KIT_ROWS", "").split(",") if r]
    shapes = [s for s in (TINY_SHAPES if tiny else SHAPES) if s[3] and (not rows_wanted or s[1] in rows_wanted)]
    for label, rows, length, _ in shapes:
        try:
            steps = 3 if tiny else SHAPE_UPDATES
            profile = _Profile(steps - 2, steps) if (not tiny and rows == 8) else None  # the last two updates
            result, metrics = kit_train(model_dir, out_dir / f"work-{recipe}-{rows}x{length}", quantization, rows,
                                        length, steps=steps, repeats=300 if tiny else 10_000,
                                        callbacks=[profile] if profile else None)
            # updates 3 .. steps-2: past the first (allocator, kernel tuning), before the profiled ones
            timed = metrics[2:steps - 2] if profile else metrics[2:]
            speeds = [m["tokens_per_s"] for m in timed] or [m["tokens_per_s"] for m in metrics]
            tok_s = statistics.median(speeds)
            per_sample = result["data"]["tokens"] / max(1, result["data"]["samples"])
            flops = fp.flops_per_token(_Cfg(cfg), (per_sample + 1) / 2)
            tokens = rows * length
            emit({"kind": "shape", "shape": label, "tokens": tokens, "step_s": tokens / tok_s, "tok_s": tok_s,
                  "peak_gib": result["peak_memory_mb"] / 1024, "mfu": flops * tok_s / (PEAK_TFLOPS * 1e12),
                  "loss": result["final_loss"], "plan": _plan_line(result)})
            if profile is not None and profile.table:
                emit({"kind": "profile", "table": profile.table, "gpu_busy": profile.busy})
            _free(result)
        except Exception as e:  # one shape's failure (out of memory, unsupported) must not hide the others
            emit({"kind": "shape", "shape": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            traceback.print_exc()
            _reset_peak()
    if homework:
        homework_worker(f"homework-{quantization}", model_dir, tiny, emit, out_dir)


def worker(recipe, model_dir, tiny, out_path, homework):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TINY if tiny else REAL
    shapes = TINY_SHAPES if tiny else SHAPES
    emit = lambda rec: open(out_path, "a").write(json.dumps({"recipe": recipe, **rec}) + "\n")  # noqa: E731
    if recipe.startswith("homework-"):
        return homework_worker(recipe, model_dir, tiny, emit, out_path.parent)
    if recipe.startswith("kit"):
        emit({"kind": "setup", "what": "notebook 02's helpers.train.train, quantization "
              + ("nf4" if recipe == "kit-4bit" else "auto"), "load_s": 0.0, "versions": versions()})
        return kit_worker(recipe, model_dir, tiny, emit, out_path.parent, homework)
    t0 = time.perf_counter()
    model, what = load_peer(recipe, model_dir, tiny)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=device == "cuda")
    emit({"kind": "setup", "what": what, "load_s": time.perf_counter() - t0, "plan": None, "versions": versions()})
    samples = course_samples(4000, cfg["vocab_size"], seed=1)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    from helpers.train import plan as fp

    def make_step(shape):
        rows = rows_for(shape, samples)
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
            continue  # Liger's gains are in long packed rows; the table leaves these out
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


class _Cfg:
    def __init__(self, d):
        self.__dict__.update(d)


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
def homework_rows(results):
    """Homework time per recipe: measured end to end for the kit, projected from timed steps for the peers."""
    tokens = HOMEWORK_EPOCHS * HOMEWORK_SAMPLES * 48
    rows = []
    for recipe, recs in results.items():
        shapes = {r["shape"]: r for r in recs if r.get("kind") == "shape" and "tok_s" in r}
        if recipe.startswith(("kit", "homework")):
            continue  # measured through train(): the homework table
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
    homework = [r for v in results.values() for r in v if r.get("kind") == "homework"]
    if homework:
        lines.append("The homework through notebook 02's train() (notebook 01's data, repeats 10,000, general 0.2):")
        lines.append("")
        lines.append("| quantization | memory cap | what the plan picked | updates | median tok/s | peak GiB | loss first → last "
                     "| grad norm | training s | student's wall s (start of train() → saved adapter) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in homework:
            cap = f"{r['cap_gib']:.0f} GB" if r.get("cap_gib") else "none"
            norm = f"finite (max {r['grad_norm_max']:.2f})" if r["grad_norm_finite"] else "**not finite**"
            lines.append(f"| {r['quantization']} | {cap} | {r['picked']} | {r['updates']} | {r['tok_s']:,.0f} | "
                         f"{r['peak_gib']:.1f} | {r['loss_first']:.3f} → {r['loss_last']:.4f} | {norm} | "
                         f"{r['train_s']:.1f} | {r['wall_s']} |")
        lines.append("")
    peers = homework_rows(results)
    if peers:
        lines.append("| homework, peers (10,001 × ~48 tokens, 2 epochs) | how | seconds | |")
        lines.append("|---|---|---|---|")
        for recipe, how, sec, kind, _ in peers:
            lines.append(f"| {recipe} | {how} | {sec:,.1f} | {kind} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    (out_dir / "tables.md").write_text(text + "\n")
    for k, v in results.items():
        for r in v:
            if r.get("kind") == "profile":
                (out_dir / f"profile_{k}.txt").write_text(r["table"])
                busy = f", GPU busy {100 * r['gpu_busy']:.0f}% of the wall time" if r.get("gpu_busy") else ""
                head = "\n".join(r["table"].splitlines()[:24])
                print(f"\nprofile ({k}, the last 2 of {SHAPE_UPDATES} updates at 8 × 2048{busy}):\n{head}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny dims (CPU check)")
    ap.add_argument("--recipes", default=",".join(RECIPES),
                    help="comma list of " + ", ".join(RECIPES + ["homework-<quantization>[@<GiB>]"]))
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="folder for results")
    ap.add_argument("--model-dir", default=None, help="where the random-weight model is built (default: tmp)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per recipe")
    ap.add_argument("--no-homework", action="store_true")
    ap.add_argument("--kit-rows", default="", help="only these packed shapes for the kit, e.g. 4,8 (rows × 2048)")
    ap.add_argument("--deadline", type=int, default=0, help="stop starting recipes after this many seconds (0: none)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kit_rows:
        os.environ["BENCH_KIT_ROWS"] = args.kit_rows  # the workers inherit it
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
            if r.get("kind") in ("shape", "homework"):
                print("   ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "recipe"}, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
