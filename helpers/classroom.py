"""Class runs: the course once per student, each into its own work directory.

    python -m helpers run --class students.csv [--work-dir CLASS_DIR] [--only 00,01] [-p NAME VALUE]

students.csv has the columns student_id and name, plus any notebook parameter (an empty cell keeps the
default). One student's failure does not stop the others; the summary is printed and saved as
CLASS_DIR/class_summary.csv and class_summary.md.
"""
from __future__ import annotations

import csv
import io
import re
import sys
import time
from pathlib import Path

from .data import atomic_write_text
from .paths import work as make_work

REQUIRED = ("student_id", "name")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a directory name
SUMMARY_COLUMNS = ["student_id", "name", "status", "notebooks", "reason", "seconds", "work_dir"]


class ClassFileError(ValueError):
    """A bad students CSV; the message names the file, line and column, and the fix."""


def declared_parameters() -> set[str]:
    """Every parameter some course notebook declares."""
    import papermill as pm

    from .runner import course_notebooks

    return {name for nb in course_notebooks() for name in pm.inspect_notebook(str(nb))}


def read_class(csv_path: str | Path, known: set[str] | None = None) -> list[dict]:
    """The students of a class CSV: [{"student_id", "name", "params": {...}}], checked before anyone runs."""
    path = Path(csv_path)
    if not path.is_file():
        raise ClassFileError(f"{path}: no such file; give a CSV with the columns student_id,name (+ parameters).")
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")))  # -sig: Excel writes a BOM
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ClassFileError(f"{path}: line 1: the header lacks {', '.join(missing)}; "
                             f"start the file with 'student_id,name' (then any parameter columns).")
    extra = [h for h in header if h not in REQUIRED]
    if "work_dir" in extra:
        raise ClassFileError(f"{path}: line 1: column 'work_dir' is set per student by the class run; drop that column.")
    known = declared_parameters() if known is None else known
    unknown = [h for h in extra if h not in known]
    if unknown:
        raise ClassFileError(f"{path}: line 1: column(s) {unknown} are not a parameter of any notebook; "
                             f"fix the spelling or drop them (parameters: {', '.join(sorted(known - {'work_dir'}))}).")
    students, seen = [], {}
    for line, row in enumerate(reader, 2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if not any(row.values()):
            continue
        sid, name = row.get("student_id", ""), row.get("name", "")
        if not SAFE_ID.match(sid):
            raise ClassFileError(f"{path}: line {line}: student_id {sid!r} cannot name a directory; use letters, "
                                 f"digits, '_', '-' or '.', starting with a letter or digit.")
        if sid in seen:
            raise ClassFileError(f"{path}: line {line}: student_id {sid!r} is already used on line {seen[sid]}; "
                                 f"give every student their own id.")
        if not name:
            raise ClassFileError(f"{path}: line {line}: the name of {sid} is empty; write the student's name.")
        seen[sid] = line
        params = {k: v for k, v in row.items() if k in extra and v != ""}
        students.append({"student_id": sid, "name": name, "params": {"name": name, **params}})
    if not students:
        raise ClassFileError(f"{path}: no students below the header; add one line per student.")
    return students


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


def run_class(csv_path, work_dir=None, only: list[str] | None = None, params: dict | None = None) -> int:
    """Run the course for every student; print and save the summary. Returns 0 when all passed, else 1."""
    from .runner import course_notebooks, print_table, run_course

    try:
        students = read_class(csv_path)
    except ClassFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    notebooks = course_notebooks(only)
    root = class_root(work_dir)
    rows = []
    for n, student in enumerate(students, 1):
        sid = student["student_id"]
        work = make_work(root / sid)
        print(f"\n=== student {n}/{len(students)}: {sid} ({student['name']}) -> {work.root}", flush=True)
        start = time.time()
        try:
            status = run_course(work.root, only, {**(params or {}), **student["params"]})
            crash = ""
        except (Exception, SystemExit) as e:  # one student's failure never stops the class
            status, crash = 1, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ran, reason = failure_reason(work, notebooks, start - 1)
        passed = status == 0 and not reason
        rows.append({"student_id": sid, "name": student["name"], "status": "passed" if passed else "FAILED",
                     "notebooks": f"{ran}/{len(notebooks)}", "reason": "" if passed else (crash or reason or "failed"),
                     "seconds": f"{time.time() - start:.1f}", "work_dir": str(work.root)})
    print(f"\n=== class summary ({sum(r['status'] == 'passed' for r in rows)} of {len(rows)} passed)")
    print_table(SUMMARY_COLUMNS, [[r[c] for c in SUMMARY_COLUMNS] for r in rows])
    save_summary(root, rows)
    print(f"\nsummary: {root / 'class_summary.csv'}\n         {root / 'class_summary.md'}")
    return 0 if all(r["status"] == "passed" for r in rows) else 1


def save_summary(root: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(root / "class_summary.csv", buf.getvalue())
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    md = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    md += ["| " + " | ".join(cell(r[c]) for c in SUMMARY_COLUMNS) + " |" for r in rows]
    atomic_write_text(root / "class_summary.md", "\n".join(md) + "\n")
