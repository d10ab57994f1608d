"""What the fine-tune cost, at the real model's size on the GPU: the homework (notebooks 00 -> 03, preset
"homework", 10,000 identity records) on a Llama with internlm2-chat-1.8b dimensions and random weights, then
`helpers.evaluate.fine_tune_cost` — the same function notebook 04 and `python -m helpers evaluate` call — for the
base, base + adapter and final_model. Prints the table, the seconds and the peak GPU memory of the evaluation.

    python benchmarks/gpu_evaluate.py --work /tmp/eval-gpu          # on the GPU machine
    python benchmarks/gpu_evaluate.py --work /tmp/course-gpu --reuse  # a work dir gpu_course.py left (--keep)
    python benchmarks/gpu_evaluate.py --tiny --work /tmp/eval-tiny    # tiny dims on a CPU: checks the script only

The GPU machine needs the course's wheels and lm-eval's: `python benchmarks/course_wheels.py --evaluate --dest .whl`
here, carry `.whl`, then `pip install --no-deps .whl/*.whl` there (benchmarks/README.md, "What the fine-tune cost").
With random weights the accuracy is chance for every model (there is no knowledge to lose); the run measures that
the path works at this size, what it costs in time and memory, and that the identity and the loss move.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_sampler import GpuSampler  # noqa: E402
from random_model import build_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/eval-gpu", help="the homework's work directory")
    ap.add_argument("--reuse", action="store_true", help="evaluate the work dir as it is (notebooks 00-03 ran)")
    ap.add_argument("--model-dir", default=None, help="where the random-weight model is built")
    ap.add_argument("--tiny", action="store_true", help="tiny dims and the tiny preset (a CPU check of the script)")
    ap.add_argument("--tasks", nargs="+", default=["course_mc"], help="lm-eval tasks (the GPU machine is offline)")
    args = ap.parse_args(argv)

    import torch

    from helpers.evaluate import cost_rows, fine_tune_cost
    from helpers.paths import work as make_work
    from helpers.progress import print_table
    from helpers.runner import run_course

    w = make_work(args.work)
    if not args.reuse:
        model_dir = Path(args.model_dir or f"/tmp/kit-bench-{'tiny' if args.tiny else 'real'}")
        build_model(model_dir, args.tiny)
        if w.root.exists():
            shutil.rmtree(w.root)
        params = {"base_model": str(model_dir), "preset": "tiny" if args.tiny else "homework"}
        if not args.tiny:
            params["repeats"] = 10000
        start = time.perf_counter()
        if run_course(w.root, only=["00", "01", "02", "03"], params=params, quiet=True) != 0:
            print(f"the homework run failed; see {w.executed}")
            return 1
        print(f"homework (notebooks 00-03): {time.perf_counter() - start:.0f} s", flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    start = time.perf_counter()
    with GpuSampler(0.5) as sampler:
        result = fine_tune_cost(w, args.tasks)
    seconds = time.perf_counter() - start
    peak = f"{sampler.peak_mib() / 1024:.1f} GiB" if sampler.ok else "–"
    what = "the work dir's models" if args.reuse else \
        f"{'tiny' if args.tiny else 'internlm2-chat-1.8b'} dims, random weights"
    print(f"\nwhat the fine-tune cost ({what}; {device}; {seconds:.0f} s for 3 models; peak GPU memory {peak}):")
    print_table(["measure", "base", "base + adapter", "final_model", "delta"], cost_rows(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
