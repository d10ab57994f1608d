"""The class run and the class check: one task per student, run by an engine, then the summary printed and
saved as CSV and Markdown in the class directory."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import yaml

from ..data import atomic_write_text
from ..notebooks import course_notebooks, notebook_parameters
from ..paths import work as make_work
from ..progress import print_table
from ..publish import PublishError, refuse_credentials
from .engines import ClassRunError, SlurmOptions, _check_engine, _execute
from .roster import LOGS, ClassFileError, read_class
from .tasks import Task, _read_status

SUMMARY_COLUMNS = ["student_id", "name", "status", "notebooks", "reason", "seconds", "attempts", "work_dir"]
CHECK_COLUMNS = ["student_id", "name", "status", "checks", "reason", "seconds", "attempts", "work_dir"]


def failure_reason(work, notebooks: list[Path], since: float) -> tuple[int, str]:
    """How many notebooks ran through since `since`, and the first error in the executed copies."""
    import nbformat

    ran = 0
    for nb in notebooks:
        out = work.executed / nb.name
        if not out.exists() or out.stat().st_mtime < since:
            return ran, f"{nb.name} did not run"
        executed = nbformat.read(out, as_version=4)
        for i, cell in enumerate(executed.cells):
            for o in cell.get("outputs", []):
                if o.get("output_type") == "error":
                    evalue = (o.get("evalue") or "").strip().splitlines()
                    return ran, f"{nb.name} cell {cell.get('execution_count') or i + 1}: {o.get('ename')}: {evalue[0] if evalue else ''}"
        ran += 1
    return ran, ""


def class_root(work_dir=None) -> Path:
    """The class directory: --work-dir, else ./work/class."""
    return make_work(work_dir).root if work_dir else make_work().root / "class"


def _student_work(root: Path, sid: str):
    return make_work(root / sid, create=False)  # the student's own run creates it


def _class_to_run(csv_path, workers: int, slurm) -> list[dict] | None:
    """The class file's students once the pool or Slurm settings are known good; None after one error sentence."""
    try:
        _check_engine(workers, slurm)
        return read_class(csv_path)
    except (ClassFileError, ClassRunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


class _QuotedStrings(yaml.SafeDumper):
    """Every text quoted: a name such as 1e3 stays text (the run types the other cells by their notebook)."""


_QuotedStrings.add_representer(str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text,
                                                                                style='"'))


def run_class(csv_path, work_dir=None, only: list[str] | None = None, params: dict | None = None,
              workers: int = 1, slurm: SlurmOptions | None = None) -> int:
    """Run the course for every student; print and save the summary. Returns 0 when all passed, 130 when a
    Ctrl-C stopped the run, else 1."""
    students = _class_to_run(csv_path, workers, slurm)
    if students is None:
        return 2
    try:  # -p / -f values go into every student's parameter file: refused before any is written
        refuse_credentials(params or {})
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    notebooks = course_notebooks(only)
    declared = notebook_parameters()
    selected = {name for nb in notebooks for name in declared[nb.name[:2]]}
    root = class_root(work_dir)
    logs = root / LOGS / "run"
    tasks = []
    for student in students:
        sid = student["student_id"]
        params_file = logs / f"{sid}.yaml"  # also how to re-run one student by hand: run --work-dir DIR -f FILE
        settings = {**(params or {}), **student["params"]}
        if only:  # the run refuses parameters of notebooks it leaves out (the CSV's name, for --only 02)
            settings = {k: v for k, v in settings.items() if k in selected}
        atomic_write_text(params_file, yaml.dump(settings, Dumper=_QuotedStrings, allow_unicode=True, sort_keys=False))
        argv = [sys.executable, "-m", "helpers", "run", "--work-dir", str(_student_work(root, sid).root),
                "-f", str(params_file)] + (["--only", ",".join(nb.stem for nb in notebooks)] if only else [])
        tasks.append(Task(sid, student["name"], argv, str(logs / f"{sid}.log"), str(logs / f"{sid}.status.json"),
                          total=len(notebooks)))
    results = _execute(tasks, root, workers, slurm)
    if results is None:
        return 2
    rows = []
    for task, r in zip(tasks, results):
        work = _student_work(root, task.student_id)
        ran, reason = failure_reason(work, notebooks, r["attempt_started"] - 1) if r["attempts"] else (0, "")
        passed = r["code"] == 0 and not reason
        if not passed and (r.get("error") or not reason or reason.endswith("did not run")):
            reason = r.get("error") or r["last_line"] or reason or f"exit code {r['code']}"
        if r.get("interrupted"):  # the notebook it was in is half run: count only those it finished
            ran, reason = min(ran, _read_status(task).get("done", 0)), _interrupted_reason(r)
        rows.append({"student_id": task.student_id, "name": task.name, "status": _status(r, passed),
                     "notebooks": f"{ran}/{len(notebooks)}", "reason": "" if passed else reason,
                     "seconds": f"{r['seconds']:.1f}", "attempts": r["attempts"], "work_dir": str(work.root)})
    return _finish(root, "class_summary", "class summary", SUMMARY_COLUMNS, rows)


def check_class(csv_path, class_dir=None, workers: int = 1, slurm: SlurmOptions | None = None,
                flags: list[str] = ()) -> int:
    """`homework check` for every student of a class, in parallel; saves class_check.csv/.md. 0 when all pass."""
    students = _class_to_run(csv_path, workers, slurm)
    if students is None:
        return 2
    root = class_root(class_dir)
    logs = root / LOGS / "check"
    tasks = []
    for student in students:
        sid = student["student_id"]
        argv = [sys.executable, "-m", "helpers", "homework", "check", str(_student_work(root, sid).root),
                f"--name={student['name']}", "--json", str(logs / f"{sid}.json")]  # '=': a name may start with '-' 
        argv += list(flags)  # homework check's own flags, as the teacher gave them
        (logs / f"{sid}.json").unlink(missing_ok=True)
        tasks.append(Task(sid, student["name"], argv, str(logs / f"{sid}.log"), str(logs / f"{sid}.status.json"),
                          final_codes=(0, 1)))  # a failed check is a verdict; only a crash is retried
    results = _execute(tasks, root, workers, slurm)
    if results is None:
        return 2
    rows = []
    for task, r in zip(tasks, results):
        try:
            checks = json.loads((logs / f"{task.student_id}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            checks = None
        failed = [c for c in checks or [] if c["status"] == "FAIL"]
        passed = r["code"] == 0 and checks is not None and not failed
        reason = ("; ".join(f"{c['name']}: {c['reason']}" for c in failed) if checks is not None
                  else r.get("error") or r["last_line"] or f"exit code {r['code']}")
        if r.get("interrupted"):
            reason = _interrupted_reason(r)
        rows.append({"student_id": task.student_id, "name": task.name, "status": _status(r, passed),
                     "checks": f"{sum(c['status'] == 'PASS' for c in checks or [])}/{len(checks or [])}",
                     "reason": "" if passed else reason, "seconds": f"{r['seconds']:.1f}", "attempts": r["attempts"],
                     "work_dir": str(_student_work(root, task.student_id).root)})
    return _finish(root, "class_check", "class check", CHECK_COLUMNS, rows)


def _status(result: dict, passed: bool) -> str:
    return "interrupted" if result.get("interrupted") else "passed" if passed else "FAILED"


def _interrupted_reason(result: dict) -> str:
    return ("stopped" if result["attempts"] else "not started") + ": the class run was interrupted (Ctrl-C)"


def _finish(root: Path, stem: str, title: str, columns: list[str], rows: list[dict]) -> int:
    interrupted = sum(r["status"] == "interrupted" for r in rows)
    print(f"\n=== {title} ({sum(r['status'] == 'passed' for r in rows)} of {len(rows)} passed"
          + (f", {interrupted} interrupted)" if interrupted else ")"))
    print_table(columns, [[r[c] for c in columns] for r in rows])
    save_summary(root, rows, columns, stem)
    print(f"\nsummary: {root / (stem + '.csv')}\n         {root / (stem + '.md')}\nlogs:    {root / LOGS}")
    if interrupted:
        return 130  # what a shell reports for a command ended by Ctrl-C
    return 0 if all(r["status"] == "passed" for r in rows) else 1


def save_summary(root: Path, rows: list[dict], columns: list[str] = SUMMARY_COLUMNS, stem: str = "class_summary") -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(root / f"{stem}.csv", buf.getvalue())
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    atomic_write_text(root / f"{stem}.md", "\n".join(md) + "\n")
