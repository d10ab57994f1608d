"""A class run measured end to end: N students through `python -m helpers run --class --workers W`, then
`homework check --class` over the same class, on this machine's GPUs (or its CPU with --tiny).

The base model is built once and shared: a random-weight Llama at internlm2-chat-1.8b dimensions (hidden
2048, 24 layers, 16 heads / 8 key-value heads, FFN 8192, vocab 92,544) with the kit's own tokenizer.
Every student gets their own name; one gets a broken parameter (general_ratio 2) and must fail with its
sentence. Notebooks 00-04 and 06 (publishing to the default local bare remote), `preset homework`.
Prints a table (wall time, per-student time, GPU busy share, the summary, the check) and writes it as
JSON and Markdown to --out.

    python benchmarks/class_run.py --students 30 --workers 8                 # one 8-GPU machine
    CUDA_VISIBLE_DEVICES=0 python benchmarks/class_run.py --students 4 --workers 1   # scaling: 1 GPU ...
    python benchmarks/class_run.py --students 4 --workers 2                  # ... and 2 GPUs
    python benchmarks/class_run.py --tiny --students 3 --workers 2           # dry run on a CPU: tiny dims
"""
from __future__ import annotations

import argparse
import csv
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

SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许韩冯邓曹"
GIVEN = "明红刚伟芳娜敏静丽强磊军洋勇艳杰娟涛超霞平刚桂英华玉兰秀"
BROKEN = ("general_ratio", "2", "general_ratio is 2.0; use a share between 0 and 1")


def write_class(path: Path, students: int) -> list[str]:
    """students.csv with distinct names; the middle student gets the broken parameter."""
    names = [SURNAMES[i % len(SURNAMES)] + GIVEN[(i * 7) % len(GIVEN)] + (str(i // len(SURNAMES)) if i >= len(SURNAMES) else "")
             for i in range(students)]
    broken = students // 2
    rows = [f"s{i + 1:02d},{name},{BROKEN[1] if i == broken else ''}" for i, name in enumerate(names)]
    path.write_text(f"student_id,name,{BROKEN[0]}\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return [f"s{broken + 1:02d}"]


def timed(argv: list[str], log: Path, env: dict) -> float:
    start = time.time()
    with log.open("w") as f:
        subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return time.time() - start


def read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", type=int, default=30)
    p.add_argument("--workers", type=int, default=8, help="students at once (one GPU each, round robin)")
    p.add_argument("--tiny", action="store_true", help="tiny dims and the tiny preset: a dry run on a CPU")
    p.add_argument("--only", default=None, help="notebooks (default 00,01,02,03,04,06)")
    p.add_argument("--preset", default=None, help="notebook 02's preset (default: homework; tiny with --tiny)")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="more parameters for every student, e.g. -p repeats 10000")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="where the class and the tables go")
    args = p.parse_args(argv)

    out = Path(args.out or tempfile.mkdtemp(prefix="class-run-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / ("base-model-tiny" if args.tiny else "base-model-internlm2-1.8b")
    t0 = time.time()
    build_model(model_dir, args.tiny)
    build_s = time.time() - t0
    students_csv = out / "students.csv"
    broken = write_class(students_csv, args.students)
    class_dir = out / "class"
    only = args.only or "00,01,02,03,04,06"
    preset = args.preset or ("tiny" if args.tiny else "homework")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    py = [sys.executable, "-m", "helpers"]
    homework_data = [] if args.tiny else [("repeats", "10000")]  # notebook 01's homework size (its default is tiny's)
    params = [x for name, value in [("base_model", str(model_dir)), ("preset", preset), *homework_data, *args.param]
              for x in ("-p", name, value)]

    with GpuSampler(1.0) as sampler:
        run_s = timed(py + ["run", "--class", str(students_csv), "--work-dir", str(class_dir), "--only", only,
                            "--workers", str(args.workers), *params], out / "class_run.log", env)
    skip = [] if "05" in only.split(",") else ["--skip", "vlm"]  # the class did not run the VLM notebook
    check_s = timed(py + ["homework", "check", str(class_dir), "--class", str(students_csv), "--workers",
                          str(args.workers), "--publish", *skip], out / "class_check.log", env)

    summary = read_csv(class_dir / "class_summary.csv")
    passed = [r for r in summary if r["status"] == "passed"]
    seconds = [float(r["seconds"]) for r in passed]
    broken_rows = [r for r in summary if r["student_id"] in broken]
    broken_ok = all(r["status"] == "FAILED" and BROKEN[2] in r["reason"] for r in broken_rows)
    check_counts: dict[str, int] = {}
    for r in summary:
        verdicts_file = class_dir / "_logs" / "check" / f"{r['student_id']}.json"
        if verdicts_file.exists():
            for c in json.loads(verdicts_file.read_text(encoding="utf-8")):
                check_counts[c["name"]] = check_counts.get(c["name"], 0) + (c["status"] == "PASS")
    busy = sampler.busy_share()
    # Each notebook's time per passing student (papermill records it in the executed notebook): where the class waits.
    durations: dict[str, list[float]] = {}
    for r in passed:
        for nb in sorted((Path(r.get("work_dir") or class_dir / r["student_id"]) / "executed").glob("*.ipynb")):
            meta = json.loads(nb.read_text(encoding="utf-8")).get("metadata", {}).get("papermill", {})
            if meta.get("duration") is not None:
                durations.setdefault(nb.name[:2], []).append(float(meta["duration"]))
    per_notebook = {k: round(statistics.median(v), 1) for k, v in sorted(durations.items())}
    result = {
        "students": args.students, "workers": args.workers, "dims": "tiny" if args.tiny else "internlm2-chat-1.8b",
        "preset": preset, "notebooks": only, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "all visible"),
        "base_model_build_s": round(build_s, 1), "class_wall_s": round(run_s, 1), "check_wall_s": round(check_s, 1),
        "passed": len(passed), "failed": len(summary) - len(passed),
        "per_student_s": {"min": min(seconds, default=0), "median": statistics.median(seconds) if seconds else 0,
                          "max": max(seconds, default=0)},
        "per_notebook_median_s": per_notebook,
        "broken_student_fails_with_its_sentence": broken_ok,
        "broken_reason": broken_rows[0]["reason"] if broken_rows else "",
        "retries": {r["student_id"]: int(r["attempts"]) for r in summary if int(r["attempts"]) > 1},
        "gpu_busy_share": busy, "gpu_peak_memory_gib": round(sampler.peak_mib() / 1024, 1),
        "gpu_busy_share_mean": round(statistics.mean(busy.values()), 3) if busy else None,
        "check_passes": check_counts,
        "check_passed_students": sum(r["status"] == "passed" for r in read_csv(class_dir / "class_check.csv")),
    }
    table = [
        "| measure | value |", "|---|---|",
        f"| class | {args.students} students, {args.workers} workers, {result['dims']}, preset {preset}, notebooks {only} |",
        f"| base model built once | {build_s:.0f} s |",
        f"| class wall time | {run_s:.0f} s ({run_s / 60:.1f} min) |",
        f"| per passing student | min {result['per_student_s']['min']:.0f} s, median {result['per_student_s']['median']:.0f} s, max {result['per_student_s']['max']:.0f} s |",
        f"| per notebook (median of passing students) | {', '.join(f'{k} {v:.0f} s' for k, v in per_notebook.items()) or '–'} |",
        f"| GPU busy share (nvidia-smi, 1 s) | {result['gpu_busy_share_mean'] if busy else 'no GPU'} {json.dumps(result['gpu_busy_share']) if busy else ''} |",
        f"| GPU memory in use, peak of one GPU | {str(result['gpu_peak_memory_gib']) + ' GiB' if busy else 'no GPU'} |",
        f"| summary | {len(passed)} passed, {len(summary) - len(passed)} failed; broken student fails with its sentence: {broken_ok} |",
        f"| retries | {result['retries'] or 'none'} |",
        f"| homework check (parallel) wall time | {check_s:.0f} s |",
        f"| homework check: students passing every check | {result['check_passed_students']} of {args.students} |",
        f"| checks passed (of {args.students}) | {', '.join(f'{k} {v}' for k, v in check_counts.items())} |",
    ]
    text = "\n".join(table)
    print(text)
    (out / "class_run.md").write_text(text + "\n", encoding="utf-8")
    (out / "class_run.json").write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"\nclass: {class_dir}\ntables: {out / 'class_run.md'}, {out / 'class_run.json'}")
    return 0 if broken_ok and len(passed) == args.students - len(broken) else 1


if __name__ == "__main__":
    sys.exit(main())
