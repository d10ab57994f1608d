"""The class file: students.csv read and checked before anyone runs (ids that name folders, names on one line,
columns that are notebook parameters)."""
from __future__ import annotations

import csv
import io
import re
import unicodedata
from pathlib import Path

from ..notebooks import course_notebooks
from ..publish import PublishError, refuse_credentials

REQUIRED = ("student_id", "name")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a directory name
LOGS = "_logs"  # inside the class directory; no student_id can start with "_"
MAX_NAME = 1000  # characters: a name goes on a command line (--name=) and into every answer the model learns


class ClassFileError(ValueError):
    """A bad students CSV; the message names the file, line and column, and the fix."""


def declared_parameters() -> set[str]:
    """Every parameter some course notebook declares."""
    import papermill as pm

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
        control = next((c for c in name if unicodedata.category(c) == "Cc"), None)
        if control is not None:
            raise ClassFileError(f"{path}: line {line}: the name of {sid} holds the control character {control!r} "
                                 f"(a line break, tab or NUL); write the name on one line without it.")
        if len(name) > MAX_NAME:
            raise ClassFileError(f"{path}: line {line}: the name of {sid} is {len(name)} characters long; shorten it "
                                 f"to at most {MAX_NAME}.")
        seen[sid] = line
        params = {k: v for k, v in row.items() if k in extra and v != ""}
        try:  # a token in a URL cell would reach the student's parameter file and executed notebooks
            refuse_credentials(params)
        except PublishError as e:
            raise ClassFileError(f"{path}: line {line}: {e}") from None
        students.append({"student_id": sid, "name": name, "params": {"name": name, **params}})
    if not students:
        raise ClassFileError(f"{path}: no students below the header; add one line per student.")
    return students
