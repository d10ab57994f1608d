"""The whole course, notebooks 00 -> 06, on a GPU at the real model's dimensions, through the runner.

Builds a Llama with internlm2-chat-1.8b dimensions and random weights (benchmarks/bench.py's model, nothing
downloaded), then runs each notebook with `helpers.runner.run_course` (papermill), preset "homework", and
prints one table: notebook, status, seconds, peak GPU memory (sampled with nvidia-smi while it runs; the
notebook's own figure where its results record one) and `identity learned` (notebooks 02-04).

    python benchmarks/gpu_course.py --work /tmp/course-gpu      # on the GPU machine
    python benchmarks/gpu_course.py --tiny --work /tmp/c        # tiny dims on a CPU: checks the script only
    python benchmarks/gpu_course.py --cap-gib 24 --readme       # also capped to a 24 GB card, both tables into the README

Each notebook's time is split as the student waits for it: load, train, generate, merge/verify, I/O and other, from
papermill's per-cell times (each cell goes to the step its code calls) and the answering time the helpers record
(`helpers.generation.TIMINGS`, saved by 04 and 05 as `answer_seconds`). 06 pushes through git-lfs where git-lfs is on
PATH (carry Debian's git-lfs .deb and put its binary on PATH); without it the push is skipped and the table says so.

The GPU machine has no papermill/ipykernel: carry them as wheels (benchmarks/README.md, "The whole course").
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
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


# The step a cell's time goes to: the first pattern its code matches (in this order).
STEPS = [("train", r"\btrain\(|train_stage\(|overfitted_run\("),
         ("merge/verify", r"\bmerge(_vlm)?\(|verify_merge|check_merged|merge_and_verify"),
         ("generate", r"before_after\(|answer_about_image\(|generate_answers\(|fine_tune_cost\(|\.ask\(|"
                      r"web_demo_transcript\(|terminal_transcript\(|VlmChat"),
         ("I/O", r"push_|build_model_repo|build_app_bundle|verify_push|make_dataset|make_llava_data|current_sources"),
         ("load", r"load_|from_pretrained|prepare_base_model|prepare_vlm|environment\(|^import|^from ")]
COLUMNS = ["load", "train", "generate", "merge/verify", "I/O", "other"]
CAP_STARTUP = """import os
if os.environ.get("KIT_GPU_MEMORY_FRACTION"):  # the whole kernel keeps to the card's share, not only training
    import torch
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(float(os.environ["KIT_GPU_MEMORY_FRACTION"]))
"""


def cell_steps(executed: Path, answer_seconds: float = 0.0) -> dict[str, float]:
    """Seconds per step of one executed notebook: papermill's per-cell durations, each cell put to the step its code
    calls; the answering time the helpers timed moves from the cells that contain it to `generate`."""
    import nbformat

    steps = dict.fromkeys(COLUMNS, 0.0)
    nb = nbformat.read(str(executed), as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        seconds = float((cell.metadata.get("papermill") or {}).get("duration") or 0.0)
        step = next((name for name, pattern in STEPS if re.search(pattern, cell.source, re.M)), "other")
        steps[step] += seconds
    moved = min(answer_seconds, sum(v for k, v in steps.items() if k != "generate"))
    for k in ("train", "other", "load", "I/O", "merge/verify"):  # evaluation rounds inside training, chats elsewhere
        take = min(moved, steps[k])
        steps[k] -= take
        steps["generate"] += take
        moved -= take
    return steps


def run_once(args, model_dir: Path, work_dir: Path, fraction: float | None) -> tuple[list, int]:
    """The course into `work_dir` (capped to `fraction` of the card when given): rows of the table, exit status."""
    from helpers.paths import work as make_work
    from helpers.runner import course_notebooks, run_course

    w = make_work(work_dir)
    if w.root.exists() and not args.keep:
        shutil.rmtree(w.root)
    params = {"base_model": str(model_dir), "preset": "tiny" if args.tiny else "homework"}
    if not args.tiny:  # the homework's data: notebook 01 with 10,000 identity records (its default is the tiny run's)
        params["repeats"] = 10000
    saved = {k: os.environ.get(k) for k in ("KIT_GPU_MEMORY_FRACTION", "IPYTHONDIR")}
    if fraction is not None:
        startup = Path(work_dir).parent / f"{Path(work_dir).name}-ipython" / "profile_default" / "startup"
        startup.mkdir(parents=True, exist_ok=True)
        (startup / "00-cap.py").write_text(CAP_STARTUP)
        os.environ.update(KIT_GPU_MEMORY_FRACTION=str(fraction), IPYTHONDIR=str(startup.parent.parent))
    rows, status = [], 0
    try:
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
            executed = w.executed / nb.name
            steps = cell_steps(executed, sum((results.get("answer_seconds") or {}).values())) if executed.exists() \
                else dict.fromkeys(COLUMNS, 0.0)
            rows.append((nb.name, "ok" if code == 0 else "FAILED", f"{seconds:.1f}",
                         *(f"{steps[c]:.1f}" for c in COLUMNS), peak, outcome(number, results)))
            print("| " + " | ".join(rows[-1]) + " |", flush=True)  # each row as it comes: a cut run keeps its rows
            if code != 0:
                status = 1
                break
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    total = sum(float(r[2]) for r in rows)
    rows.append(("**whole course**", "ok" if status == 0 else "FAILED", f"{total:.1f}",
                 *(f"{sum(float(r[3 + i]) for r in rows):.1f}" for i in range(len(COLUMNS))), "", ""))
    return rows, status


def markdown(rows: list, header: list[str]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                      ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


README_START, README_END = "<!-- gpu_course: start -->", "<!-- gpu_course: end -->"


def write_readme(text: str) -> None:
    """The tables between the README's gpu_course markers (appended as a section the first time)."""
    readme = ROOT / "benchmarks" / "README.md"
    old = readme.read_text(encoding="utf-8")
    block = f"{README_START}\n{text}\n{README_END}"
    if README_START in old:
        new = old[:old.index(README_START)] + block + old[old.index(README_END) + len(README_END):]
    else:
        new = old.rstrip("\n") + "\n\n## The whole course as the student waits for it (`gpu_course.py`)\n\n" + block + "\n"
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, readme)


def batched_answers_differ(w) -> str:
    """How many of notebook 04's answers (table, paraphrases, general questions) differ between the batched path and
    one question at a time, on final_model as the notebook loads it (bf16 on a GPU)."""
    from helpers.chat import general_questions
    from helpers.generation import generate_answers
    from helpers.homework import PARAPHRASES
    from helpers.merge import load_model, load_tokenizer

    data = json.loads(w.result("01_data_generation").read_text(encoding="utf-8"))
    questions = list(data["evaluation_inputs"]) + PARAPHRASES + [g["input"] for g in general_questions()]
    model, tokenizer = load_model(w.final_model), load_tokenizer(w.final_model)
    start = time.perf_counter()
    alone = generate_answers(model, tokenizer, questions, system=data.get("system", ""), batch_size=1)
    one_by_one = time.perf_counter() - start
    start = time.perf_counter()
    together = generate_answers(model, tokenizer, questions, system=data.get("system", ""))
    batched = time.perf_counter() - start
    differ = sum(a != b for a, b in zip(alone, together))
    return (f"Batched answers on final_model ({model.dtype}): {differ} of {len(questions)} differ from one question at "
            f"a time; {batched:.1f} s together against {one_by_one:.1f} s one by one.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/course-gpu", help="the course's work directory (replaced)")
    ap.add_argument("--model-dir", default=None, help="where the random-weight model is built")
    ap.add_argument("--tiny", action="store_true", help="tiny dims and the tiny preset (a CPU check of the script)")
    ap.add_argument("--only", default=None, help="comma-separated notebook numbers (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (run further notebooks into it)")
    ap.add_argument("--check", action="store_true",
                    help="then grade the work dir as a teacher would (homework check with --require-base/-preset)")
    ap.add_argument("--cap-gib", type=float, default=None,
                    help="then run the course again with every kernel capped to this many GiB (24: the course's slice)")
    ap.add_argument("--readme", action="store_true", help="write the tables into benchmarks/README.md")
    args = ap.parse_args(argv)

    model_dir = Path(args.model_dir or f"/tmp/kit-bench-{'tiny' if args.tiny else 'real'}")
    t0 = time.perf_counter()
    build_model(model_dir, args.tiny)
    print(f"model ({'tiny' if args.tiny else 'internlm2-chat-1.8b'} dims, random weights): {model_dir} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    from helpers.paths import work as make_work

    header = ["notebook", "status", "seconds", *(f"{c} s" for c in COLUMNS), "peak GPU memory", "outcome"]
    runs = [("uncapped", None)]
    if args.cap_gib:
        import torch

        total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else args.cap_gib
        runs.append((f"capped to {args.cap_gib:g} GiB", min(1.0, args.cap_gib / total)))
    lfs = shutil.which("git-lfs") or subprocess.run(["git", "lfs", "version"], capture_output=True).returncode == 0
    note = "06 pushed through git-lfs" if lfs else "git-lfs is not on PATH here: 06's push was skipped (its row says why)"
    texts, status = [], 0
    for label, fraction in runs:
        work_dir = Path(args.work) if fraction is None else Path(f"{args.work}-capped")
        rows, code = run_once(args, model_dir, work_dir, fraction)
        status = status or code
        texts.append(f"**{label}** ({note}; answering time from the helpers' own timers):\n\n{markdown(rows, header)}")
        print(f"\n{texts[-1]}\n", flush=True)
    w = make_work(args.work)
    if status == 0 and (w.final_model / "config.json").exists():
        texts.append(batched_answers_differ(w))
        print(texts[-1], flush=True)
    if args.readme:
        write_readme("\n\n".join(texts))
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
