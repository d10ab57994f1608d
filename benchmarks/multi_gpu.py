"""The homework on 1 and 2 GPUs through helpers.train.train: DDP, DeepSpeed ZeRO-2 and FSDP beside one GPU.

A random-weight Llama at internlm2-chat-1.8b dimensions (hidden 2048, 24 layers, 16/8 heads, FFN 8192,
vocab 92,544, bf16; nothing is downloaded) trains the whole homework as a student runs it (notebook 01's data
with repeats 10,000, 2 epochs, 16 x 1024 tokens per update, LoRA r=64 on all linear layers, lr 2e-4; dropout 0
so that the curves compare update by update), or --steps updates, once per setup, each through
`python -m helpers train --num-gpus N --distributed X` (notebook 02's training). The table: tokens/s (median of
the logged intervals after the first two), ratio to one GPU (target >= 1.8x for DDP), each GPU's busy share
over those intervals (nvidia-smi every 0.2 s), loss first -> last and the largest gap to the 1-GPU curve, how
far the learned adapter (its lora_B weights) is from the 1-GPU one, peak memory of the main rank, and the
training and wall seconds (load to saved adapter) from the run's record.

On the 2 x H200 machine (python 3.12, torch 2.11, transformers 5.17, accelerate 1.15), one command, ~8 min;
the wheels are carried in .whl (peft, bitsandbytes) and .whl13 (deepspeed and what it needs):

    pip install -q --no-deps .whl/peft-*.whl && pip install -q --no-index --find-links .whl13 deepspeed && python benchmarks/multi_gpu.py --out $OUT

CPU dry run (tiny dims, 2 processes over gloo; ZeRO-2 and FSDP say in one sentence why they are skipped):

    python benchmarks/multi_gpu.py --tiny
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_sampler import GpuSampler  # noqa: E402
from random_model import build_model  # noqa: E402

SETUPS = [("1 GPU", 1, "ddp"), ("2 GPUs DDP", 2, "ddp"), ("2 GPUs ZeRO-2", 2, "zero2"), ("2 GPUs FSDP", 2, "fsdp")]


def run_setup(label, gpus, strategy, model_dir, data, root, steps, tiny) -> dict:
    """One training through the kit's command line; the figures come from the files it wrote and nvidia-smi."""
    from helpers.paths import work as make_work
    from helpers.train import evaluation_rounds, read_metrics

    w = make_work(root / label.replace(" ", "_"))
    w.dataset.parent.mkdir(parents=True, exist_ok=True)
    w.dataset.write_bytes(data.read_bytes())
    # The homework as a student runs it (notebook 01's data, 2 epochs, the preset's logging every 10 updates);
    # dropout 0 so that the setups' curves can be compared update by update.
    config = dict(preset="homework", base_model=str(model_dir), max_new_tokens=16, lora_dropout=0.0, resume=False)
    if steps:
        config |= dict(max_steps=steps, evaluation_freq=steps, save_steps=steps, logging_steps=max(1, steps // 8))
    if tiny:
        config |= dict(max_length=256, lr=2e-3)
    command = [sys.executable, "-m", "helpers", "train", "--work-dir", str(w.root), "--num-gpus", str(gpus),
               "--distributed", strategy, "--config-json", json.dumps(config)]
    start = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # carried wheels stay found
    with GpuSampler(0.2) as sampler:
        done = subprocess.run(command, env=os.environ | {"PYTHONPATH": path, "KIT_HEADLESS": "1"},
                              capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "no output")
        log = f"{label.replace(' ', '_')}.log"
        for folder in {root, Path(os.environ.get("OUT") or root)}:  # kept with the tables where there is an $OUT
            (folder / log).write_text((done.stdout + done.stderr)[-20000:])
        return {"setup": label, "status": why[:200], "seconds": round(seconds)}
    record = json.loads((w.adapter / "training_record.json").read_text())
    metrics = read_metrics(w)
    timed = metrics[2:] if len(metrics) > 3 else metrics[1:] or metrics  # past the first rows' warm-up
    busy = sampler.busy_share(since=timed[0]["time"] - 1, until=timed[-1]["time"]) if sampler.ok else {}
    rounds = evaluation_rounds(w)
    return {"setup": label, "status": "ok", "seconds": round(seconds), "updates": record["steps"],
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
            "losses": [m["loss"] for m in metrics], "peak_memory_gib": round(record["peak_memory_mb"] / 1024, 1),
            "train_seconds": record["train_seconds"], "wall_seconds": record.get("wall_seconds"),
            "gpu_busy": [busy[str(i)] for i in range(gpus) if str(i) in busy],
            "adapter": str(w.adapter), "answers": rounds[-1]["answers"] if rounds else [],
            "plan": (record.get("plan") or {}).get("layers")}


def adapter_gap(adapter: str, reference: str) -> float:
    """How far an adapter's learned part (every lora_B, zero at the start) is from the reference's:
    ||B - B_ref|| / ||B_ref|| over all of them."""
    from safetensors.torch import load_file

    mine, ref = (load_file(str(Path(a) / "adapter_model.safetensors")) for a in (adapter, reference))
    keys = [k for k in ref if ".lora_B." in k]
    diff = sum(float((mine[k].float() - ref[k].float()).pow(2).sum()) for k in keys)
    norm = sum(float(ref[k].float().pow(2).sum()) for k in keys)
    return (diff / max(norm, 1e-30)) ** 0.5


def table(results: list[dict]) -> str:
    one = next((r for r in results if r["setup"] == "1 GPU" and r["status"] == "ok"), None)
    head = ("| setup | updates | tokens/s | vs 1 GPU | GPU busy | loss first → last | max gap to 1 GPU "
            "| adapter gap to 1 GPU | peak memory | training s | student's wall s |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['setup']} | {r['status']} |" + " |" * 9)
            continue
        ratio = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}×" if one else "–"
        gap = max((abs(a - b) / max(abs(b), 1e-9) for a, b in zip(r["losses"], one["losses"])), default=0.0) \
            if one else 0.0
        weights = f"{adapter_gap(r['adapter'], one['adapter']):.1%}" if one else "–"
        busy = " / ".join(f"{b:.0%}" for b in r["gpu_busy"]) or "–"
        lines.append(f"| {r['setup']} | {r['updates']} | {r['tokens_per_s']:,.0f} | {ratio} | {busy} | "
                     f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f} | {gap:.1%} | {weights} | "
                     f"{r['peak_memory_gib']} GiB | {r['train_seconds']} | {r['wall_seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny dims on a CPU (2 processes over gloo): checks the code")
    p.add_argument("--steps", type=int, default=None, help="updates per setup (default: the whole homework; 4 tiny)")
    p.add_argument("--setups", default=None, help="comma-separated labels' first words, e.g. 1,ddp (default all)")
    p.add_argument("--deadline", type=float, default=450, help="seconds; setups not started by then are skipped")
    p.add_argument("--out", default=None, help="folder for tables.md and results.json (default: the temp dir)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    steps = args.steps or (4 if args.tiny else None)

    from helpers.data import make_dataset

    root = Path(tempfile.mkdtemp(prefix="multi-gpu-"))
    model_dir = build_model(root / "random-llama", args.tiny)
    data = make_dataset(root / "data.json", repeats=400 if args.tiny else 10000, general_ratio=0.2)
    print(f"model and data ready in {time.perf_counter() - t0:.0f} s ({root})", flush=True)
    wanted = {w.strip().lower() for w in args.setups.split(",")} if args.setups else None
    out = Path(args.out) if args.out else root
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for label, gpus, strategy in SETUPS:
        if wanted and not wanted & {label.split()[0].lower(), strategy, label.split()[-1].lower()}:
            continue
        if time.perf_counter() - t0 > args.deadline:
            results.append({"setup": label, "status": f"skipped: past the {args.deadline:.0f} s deadline"})
            continue
        r = run_setup(label, gpus, strategy, model_dir, Path(data), root, steps, args.tiny)
        results.append(r)
        md = table(results)  # each setup's whole row as it ends, and the files so far: a cut run keeps them
        print(f"{label}: {r['status']} in {r.get('seconds', 0)} s\n{md.splitlines()[-1]}", flush=True)
        (out / "tables.md").write_text(md + "\n")
        (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=1))
    print("\n" + table(results))  # tables.md and results.json were written as each setup ended
    print(f"\n{steps or 'the homework: all its'} updates per setup, {time.perf_counter() - t0:.0f} s in all; results in {out}")
    return 0 if all(r["status"] == "ok" or r["status"].startswith(("error: distributed='zero2'", "error: distributed='fsdp'", "skipped"))
                    for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
