"""The whole course, notebooks 00 -> 06, on a GPU at the real model's dimensions, through the runner.

Builds a Llama with internlm2-chat-1.8b dimensions and random weights (benchmarks/bench.py's model, nothing
downloaded), then runs each notebook with `helpers.runner.run_course` (papermill), preset "homework", and
prints one table: notebook, status, seconds, peak GPU memory (sampled with nvidia-smi while it runs; the
notebook's own figure where its results record one) and `identity learned` (notebooks 02-04).

    python benchmarks/gpu_course.py --work /tmp/course-gpu      # on the GPU machine
    python benchmarks/gpu_course.py --tiny --work /tmp/c        # tiny dims on a CPU: checks the script only

The GPU machine has no papermill/ipykernel: carry them as wheels (benchmarks/README.md, "The whole course").
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_sampler import GpuSampler  # noqa: E402
from random_model import build_model  # noqa: E402


def outcome(number: str, r: dict) -> str:
    """What each notebook's results say it achieved (identity learned, merge equal, answers, push verified)."""
    if not r:
        return "–"
    if number == "02":
        return f"identity learned: {r.get('identity_learned')}, loss {r.get('first_loss', 0):.2f} → {r.get('final_loss', 0):.3f}"
    if number == "03":
        w = r.get("weights") or {}
        how = (f"weights within {w['max_ulps']:.0f} ulp, {w['rounded_away']:.0%} of the update rounded away, "
               if w else "")
        return (f"merge verified: {r.get('passed')} ({how}logits {r.get('max_abs_diff', 0):.2g} apart, bound "
                f"{r.get('tolerance') or 0:.2g} = 2 x rounding noise {r.get('rounding_noise', 0):.2g})")
    if number == "04":
        return (f"identity in {r.get('identity_on_evaluation')}/{r.get('evaluation_questions')} evaluation answers, "
                f"{r.get('identity_on_general')}/{r.get('general_questions')} held-out general")
    if number == "05":
        stages = []
        for k in ("stage1", "stage2"):
            st, hp = r.get(k) or {}, (r.get(k) or {}).get("hyper_parameters") or {}
            if st:
                stages.append(f"{k.replace('stage', 'stage ')}: {st.get('steps')} updates of {hp.get('batch_size')} rows "
                              f"x {hp.get('gradient_accumulation')} in {st.get('train_seconds')} s, loss "
                              f"{st.get('first_loss', 0):.2f} → {st.get('final_loss', 0):.3f}")
        return f"stage-2 answers match: {r.get('all_match')}" + "".join(f"; {x}" for x in stages)
    if number == "06":
        v = r.get("verified") or {}
        return f"pushed: {r.get('pushed')}, cloned back identical: {v.get('identical')} ({v.get('files')} files)"
    return "–"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/course-gpu", help="the course's work directory (replaced)")
    ap.add_argument("--model-dir", default=None, help="where the random-weight model is built")
    ap.add_argument("--tiny", action="store_true", help="tiny dims and the tiny preset (a CPU check of the script)")
    ap.add_argument("--only", default=None, help="comma-separated notebook numbers (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (run further notebooks into it)")
    ap.add_argument("--check", action="store_true",
                    help="then grade the work dir as a teacher would (homework check with --require-base/-preset)")
    args = ap.parse_args(argv)

    from helpers.paths import work as make_work
    from helpers.runner import course_notebooks, print_table, run_course

    model_dir = Path(args.model_dir or f"/tmp/kit-bench-{'tiny' if args.tiny else 'real'}")
    t0 = time.perf_counter()
    build_model(model_dir, args.tiny)
    print(f"model ({'tiny' if args.tiny else 'internlm2-chat-1.8b'} dims, random weights): {model_dir} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    w = make_work(args.work)
    if w.root.exists() and not args.keep:
        shutil.rmtree(w.root)
    params = {"base_model": str(model_dir), "preset": "tiny" if args.tiny else "homework"}
    if not args.tiny:  # the homework's data: notebook 01 with 10,000 identity records (its default is the tiny run's)
        params["repeats"] = 10000
    rows, status = [], 0
    for nb in course_notebooks(args.only.split(",") if args.only else None):
        number = nb.name[:2]
        start = time.perf_counter()
        with GpuSampler(0.5) as sampler:
            code = run_course(w.root, only=[number], params=params, quiet=True)
        seconds = time.perf_counter() - start
        results = {}
        for p in w.results.glob(f"{number}_*.json"):
            results = json.loads(p.read_text(encoding="utf-8"))
        own = results.get("peak_memory_mb")
        peak = f"{sampler.peak_mib() / 1024:.1f} GiB" if sampler.ok else "–"
        if own:
            peak += f" (training {own / 1024:.1f} GiB)"
        rows.append((nb.name, "ok" if code == 0 else "FAILED", f"{seconds:.1f}", peak, outcome(number, results)))
        print("| " + " | ".join(rows[-1]) + " |", flush=True)  # each row as it comes: a cut run keeps its rows
        if code != 0:
            status = 1
            break
    print()
    print_table(["notebook", "status", "seconds", "peak GPU memory", "outcome"], rows)
    if args.check and status == 0:
        status = grade(w.root, model_dir, "tiny" if args.tiny else "homework")
    return status


def grade(work_dir: Path, model_dir: Path, preset: str) -> int:
    """homework check as a teacher runs it on the student's work (every check loads what it judges), timed."""
    from helpers.homework import check_work, print_checks

    start = time.perf_counter()
    checks = check_work(work_dir, publish=True, allow_practice_remote=True, require_base=str(model_dir),
                        require_preset=preset)
    print(f"\nhomework check ({time.perf_counter() - start:.0f} s):")
    print_checks(checks)
    return int(any(c.status == "FAIL" for c in checks))


if __name__ == "__main__":
    raise SystemExit(main())
