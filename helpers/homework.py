"""Homework: student versions of the notebooks (solution regions blanked) and an automatic check of a
student's work directory.

    python -m helpers homework make-student OUT_DIR
    python -m helpers homework check WORK [--name NAME] [--publish]
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .classroom import add_class_arguments, check_class, with_engine
from .paths import NOTEBOOKS_DIR, Work, work as make_work
from .results import read_results, table_rows

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
_ASSIGNED = re.compile(r"^\s*([A-Za-z_][A-Za-z_0-9]*)\s*(?::[^=]*)?=(?!=)")


class MarkerError(ValueError):
    """Unbalanced solution markers; the message names notebook, cell and line."""


# ---------------------------------------------------------------- student versions
def _comment(line: str) -> str:
    """The trailing comment of one line of code ('' if none), also on a line that opens a bracket."""
    import io
    import tokenize

    try:
        for tok in tokenize.generate_tokens(io.StringIO(line).readline):
            if tok.type == tokenize.COMMENT:
                return tok.string.lstrip("#").strip()
    except (tokenize.TokenError, SyntaxError):
        pass
    return ""


def _assigned_names(region: list[str]) -> list[tuple[str, int]]:
    """(name, first line index) of each top-level assignment in a region, statements spanning lines included."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent("\n".join(region)))
    except SyntaxError:  # not valid alone: fall back to one assignment per line
        return [(m.group(1), i) for i, line in enumerate(region) if (m := _ASSIGNED.match(line))]
    out = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name):
                    out.append((n.id, node.lineno - 1))
    return out


def _todo_lines(region: list[str], indent: str) -> list[str]:
    """The TODO that replaces a region: which names to set, with the teacher's one-line hints kept."""
    todo = [f"{indent}# TODO: your part (write it here)."]
    for name, line in _assigned_names(region):
        hint = _comment(region[line])
        todo.append(f"{indent}# - set `{name}`" + (f": {hint}" if hint else ""))
    return todo + [f"{indent}raise NotImplementedError"]


def blank_solutions(source: str, where: str = "cell") -> tuple[str, int]:
    """`source` with each BEGIN/END SOLUTION region replaced by a TODO and `raise NotImplementedError`;
    returns (new source, number of regions)."""
    out, region, begin_line, regions = [], None, 0, 0
    lines = source.split("\n")
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if region is not None:
                raise MarkerError(f"{where}: line {n}: '{BEGIN}' inside the region opened on line {begin_line}; "
                                  f"close that one with '{END}' first.")
            region, begin_line, indent = [], n, line[: len(line) - len(line.lstrip())]
        elif stripped == END:
            if region is None:
                raise MarkerError(f"{where}: line {n}: '{END}' without a '{BEGIN}' before it; add the BEGIN line or drop this one.")
            out.extend(_todo_lines(region, indent))
            region, regions = None, regions + 1
        elif region is not None:
            region.append(line)
        else:
            out.append(line)
    if region is not None:
        raise MarkerError(f"{where}: line {begin_line}: '{BEGIN}' is never closed; add '{END}' after the solution.")
    return "\n".join(out), regions


def student_notebook(ipynb: Path):
    """The student version of one notebook (nbformat node) and the number of blanked regions."""
    import nbformat

    from .notebooks import CHECK_MARK

    nb = nbformat.read(ipynb, as_version=4)
    total = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and CHECK_MARK in cell.source:  # the test suite's marker, not the student's business
            cell.source = "\n".join(line for line in cell.source.split("\n") if line.strip() != f"# {CHECK_MARK}")
        if cell.cell_type != "code" or BEGIN not in cell.source and END not in cell.source:
            continue
        cell.source, n = blank_solutions(cell.source, f"{ipynb.name}: code cell {i + 1}")
        total += n
        cell.outputs, cell.execution_count = [], None  # the teacher's output belongs to the solution
    return nb, total


def make_student(out_dir: str | os.PathLike, notebooks_dir: Path = NOTEBOOKS_DIR) -> list[tuple[Path, int]]:
    """Write the student version of every notebooks/NN_*.ipynb into out_dir; returns (path, regions)."""
    import nbformat

    out = Path(out_dir).expanduser().resolve()
    if out == Path(notebooks_dir).resolve():
        raise SystemExit(f"error: {out} holds the teacher's notebooks; give another OUT_DIR for the student versions.")
    books = sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if not books:
        raise SystemExit(f"error: {notebooks_dir} has no NN_*.ipynb notebooks; build them with `python -m helpers notebooks`.")
    # Blank everything first, so a bad marker anywhere leaves OUT_DIR untouched.
    versions = [(p.name, *student_notebook(p)) for p in books]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, nb, regions in versions:
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        nbformat.write(nb, tmp)
        os.replace(tmp, out / name)
        written.append((out / name, regions))
    return written


# ---------------------------------------------------------------- the check
@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    reason: str


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _not_run(notebook: str, work: Work | None = None, what: str = "") -> str:
    """Why an artifact is missing: the notebook did not run, or it ran and the artifact is gone since."""
    if work is not None and work.result(notebook).exists():
        return f"{what} is missing although notebook {notebook} ran; run it again"
    return (f"{what} is missing: " if what else "") + f"notebook {notebook} did not run (no results/{notebook}.json)"


def expected_name(work: Work, name: str | None = None) -> str | None:
    """The name to look for: given by the teacher, else the one notebook 01 recorded."""
    if name:
        return name
    r = read_results(work, "01_data_generation") or {}
    return r.get("name")


def check_dataset(work: Work, name: str | None) -> Check:
    from .data import DataError, load_dataset

    if not work.dataset.exists():
        return Check("dataset", "FAIL", _not_run("01_data_generation", work, str(work.dataset)))
    if not name:
        return Check("dataset", "FAIL", _not_run("01_data_generation") + "; no name to look for (give --name)")
    try:
        conversations = load_dataset(work.dataset)
    except DataError as e:
        return Check("dataset", "FAIL", str(e))
    hits = sum(name in m["content"] for c in conversations for m in c if m["role"] == "assistant")
    if not hits:
        return Check("dataset", "FAIL", f"no assistant answer in {work.dataset.name} mentions {name!r}")
    return Check("dataset", "PASS", f"{hits} of {len(conversations)} records answer with {name!r}")


def identity_question(work: Work) -> str:
    from .data import COURSE_QUESTION

    r = read_results(work, "01_data_generation") or {}
    return (r.get("questions") or [COURSE_QUESTION])[0]


def load_adapter_model(work: Work):
    """Base model + WORK/adapter (peft), and the tokenizer the adapter was trained with."""
    from .base_model import base_model_path
    from .merge import load_model, load_tokenizer

    base = base_model_path(work)
    return load_model(base, work.adapter), load_tokenizer(base, work.adapter)


def check_identity(work: Work, name: str | None) -> Check:
    from .generation import generate_answers

    if not (work.adapter / "adapter_config.json").exists():
        return Check("identity", "FAIL", _not_run("02_qlora_finetune", work, f"the adapter {work.adapter}"))
    if not name:
        return Check("identity", "FAIL", "no name to look for (notebook 01 did not run; give --name)")
    question = identity_question(work)
    try:
        model, tokenizer = load_adapter_model(work)
        system = (read_results(work, "01_data_generation") or {}).get("system") or ""
        answer = generate_answers(model, tokenizer, [question], system=system)[0]
    except Exception as e:  # a broken adapter or base model is the student's failure, reported as such
        return Check("identity", "FAIL", f"the adapter does not load with its base model ({_first_line(e)})")
    if name not in answer:
        return Check("identity", "FAIL", f"asked {question!r}, the adapter answers {answer!r}, without {name!r}")
    return Check("identity", "PASS", f"asked {question!r}, the adapter answers {answer!r}")


ADAPTER_MATTERS = 3  # the adapter must move the logits by at least this many merge tolerances (a copy of the base
# then fails one way or the other: its difference is the adapter's effect)


def check_merge(work: Work, recompute: bool = True) -> Check:
    """final_model == base + adapter, judged with the checker's own tolerance (measured, never the student's),
    and the adapter must change the base's logits, so a copy of the base cannot pass."""
    r = read_results(work, "03_merge")
    if r is None:
        return Check("merge", "FAIL", _not_run("03_merge"))
    if "_unreadable" in r:
        return Check("merge", "FAIL", r["_unreadable"])
    if not recompute:
        if not r.get("passed"):
            return Check("merge", "FAIL", f"notebook 03 found max |logit diff| {r.get('max_abs_diff')} above its tolerance")
        return Check("merge", "PASS", f"max |logit diff| {float(r.get('max_abs_diff', float('nan'))):.2e} "
                                      f"(notebook 03's verdict, from results/03_merge.json)")
    if not (work.final_model / "config.json").exists():
        return Check("merge", "FAIL", _not_run("03_merge", work, f"the model in {work.final_model}"))
    try:
        from .base_model import base_model_path
        from .merge import MAX_ULPS, verify_merge

        verified = verify_merge(work.final_model, base_model_path(work), work.adapter)  # its own tolerance
    except Exception as e:
        return Check("merge", "FAIL", f"final_model and base + adapter do not both load ({_first_line(e)})")
    diff, tolerance, effect = verified["max_abs_diff"], verified["tolerance"], verified["adapter_effect_max_abs"]
    dtype, weights = verified["dtype"], verified.get("weights")
    if not verified["passed"]:
        if weights and weights["max_ulps"] > MAX_ULPS:
            return Check("merge", "FAIL", f"final_model's weights are not base + adapter rounded to {dtype}: "
                                          f"{weights['worst']} is {weights['max_ulps']:.3g} units in the last place off")
        return Check("merge", "FAIL", f"final_model differs from base + adapter: max |logit diff| {diff:.2e} > "
                                      f"{tolerance:.3g} (the checker's tolerance for {dtype})")
    floor = verified["logit_scale"]
    if not effect >= ADAPTER_MATTERS * floor:
        return Check("merge", "FAIL", f"the adapter barely changes the base (its logits move by {effect:.2e}, under "
                                      f"{ADAPTER_MATTERS} x {floor:g}): train it (notebook 02) before merging")
    how = (f"every weight within {weights['max_ulps']:.0f} ulp of W + B·A in {dtype}" if weights
           else f"max |logit diff| {diff:.2e} <= {tolerance:g}")
    return Check("merge", "PASS", f"final_model equals base + adapter: {how}; the adapter moves the logits by {effect:.2f}")


VLM_TABLE_KEYS = ("before_after", "table", "rows", "comparison")


def _is_before(column: str) -> bool:
    c = column.lower().replace("_", " ")
    return c.startswith(("before", "stage 1", "stage1"))


def _is_after(column: str) -> bool:
    c = column.lower().replace("_", " ")
    return c.startswith(("after", "stage 2", "stage2")) and not c.endswith(("match", "matches"))


def vlm_pairs(r: dict) -> list[tuple[str, str, str]]:
    """(question, before, after) rows of notebook 05's results, from its table or from parallel lists."""
    for key in VLM_TABLE_KEYS:
        rows = table_rows(r, (key,))
        if rows:
            before = next((c for c in rows[0] if _is_before(c)), None)
            after = next((c for c in rows[0] if _is_after(c)), None)
            if before and after:
                return [(str(row.get("question", row.get("prompt", ""))), row.get(before), row.get(after)) for row in rows]
    lists = {k: v for k, v in r.items() if isinstance(v, list) and v and all(isinstance(x, str) for x in v)}
    before = next((k for k in lists if _is_before(k) or k.lower().endswith("before")), None)
    after = next((k for k in lists if _is_after(k) or k.lower().endswith("after")), None)
    if not (before and after):
        return []
    questions = r.get("questions") if isinstance(r.get("questions"), list) else [""] * len(lists[before])
    return list(zip([str(q) for q in questions], lists[before], lists[after]))


def check_vlm(work: Work) -> Check:
    r = read_results(work, "05_vlm_llava_finetune")
    if r is None:
        return Check("vlm", "FAIL", _not_run("05_vlm_llava_finetune"))
    if "_unreadable" in r:
        return Check("vlm", "FAIL", r["_unreadable"])
    pairs = vlm_pairs(r)
    if not pairs:
        return Check("vlm", "FAIL", "results/05_vlm_llava_finetune.json has no before/after answers")
    changed = sum(b != a for _, b, a in pairs)
    if changed == 0:
        return Check("vlm", "FAIL", f"all {len(pairs)} after-answers equal the before-answers: stage 2 taught nothing")
    return Check("vlm", "PASS", f"{changed} of {len(pairs)} answers changed after fine-tuning")


def _remote_has(remote: str, commit: str) -> bool | None:
    """Whether a local remote (path or file://) holds the commit; None when it cannot be asked offline."""
    local = remote[len("file://"):] if remote.startswith("file://") else remote
    if "://" in local or not Path(local).exists():
        return None
    got = subprocess.run(["git", "--git-dir", local, "cat-file", "-e", f"{commit}^{{commit}}"],
                         capture_output=True, text=True)
    return got.returncode == 0


def check_publish(work: Work, required: bool) -> Check:
    r = read_results(work, "06_publish")
    status_if_missing = "FAIL" if required else "SKIP"
    if r is None:
        return Check("publish", status_if_missing, _not_run("06_publish") + ("" if required else " (optional)"))
    if "_unreadable" in r:
        return Check("publish", "FAIL", r["_unreadable"])
    push = r.get("push") if isinstance(r.get("push"), dict) else r
    commit = push.get("commit") or push.get("pushed_commit")
    remote = push.get("remote") or push.get("remote_url") or ""
    if not commit or (push.get("pushed") is False and not push.get("up_to_date")):  # up to date: pushed before
        return Check("publish", status_if_missing, "the model repo was not pushed" + ("" if required else " (optional)"))
    held = _remote_has(str(remote), str(commit))
    if held is False:
        return Check("publish", "FAIL", f"the remote {remote} does not hold the pushed commit {str(commit)[:12]}")
    where = "verified on the remote" if held else "as recorded by notebook 06"
    return Check("publish", "PASS", f"commit {str(commit)[:12]} pushed to {remote} ({where})")


CHECK_NAMES = ("dataset", "identity", "merge", "vlm", "publish")  # what check_work returns, in order


def check_work(work_dir, name: str | None = None, publish: bool = False, recompute: bool = True) -> list[Check]:
    """Every homework check on one work directory."""
    work = make_work(work_dir, create=False)
    if not work.root.is_dir():
        return [Check("work dir", "FAIL", f"{work.root} does not exist; give the student's work directory")]
    name = expected_name(work, name)
    return [check_dataset(work, name), check_identity(work, name), check_merge(work, recompute),
            check_vlm(work), check_publish(work, publish)]


def print_checks(checks: list[Check]) -> None:
    from .progress import print_table

    print_table(["check", "result", "reason"], [(c.name, c.status, c.reason) for c in checks])


# ---------------------------------------------------------------- command line
def add_command(sub) -> None:
    p = sub.add_parser("homework", help="student versions of the notebooks; check a student's work dir")
    hw = p.add_subparsers(dest="homework_command", required=True)
    m = hw.add_parser("make-student", help="write the notebooks with the solution regions blanked")
    m.add_argument("out_dir", help="where the student versions go")
    m.set_defaults(func=_make_student)
    c = hw.add_parser("check", help="check a work directory; exit code 1 on any failed check")
    c.add_argument("work_dir", nargs="?", default=None,
                   help="the student's work directory (with --class: the class directory, default ./work/class)")
    c.add_argument("--name", default=None, help="the name the assistant must give (default: the one notebook 01 used)")
    c.add_argument("--publish", action="store_true", help="require the model repo to have been pushed")
    c.add_argument("--trust-results", action="store_true",
                   help="take the merge check from results/03_merge.json instead of recomputing it")
    c.add_argument("--skip", default="", metavar="CHECKS",
                   help="checks not to run, comma-separated (e.g. vlm when the class skipped notebook 05)")
    c.add_argument("--json", default=None, metavar="FILE", help="also write the checks to FILE as JSON")
    c.add_argument("--class", dest="class_file", default=None, metavar="STUDENTS_CSV",
                   help="check every student of a class (CSV: student_id,name,...) in WORK_DIR/<student_id>")
    add_class_arguments(c)
    c.set_defaults(func=_check)


def _make_student(args) -> int:
    try:
        written = make_student(args.out_dir)
    except MarkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, regions in written:
        print(f"wrote {path}  ({regions} solution region{'s' if regions != 1 else ''} blanked)")
    return 0


def _check(args) -> int:
    import json
    import os as _os

    from .data import atomic_write_text
    from .progress import quiet_libraries

    if args.class_file:
        return with_engine(check_class, args, args.class_file, args.work_dir, publish=args.publish,
                           trust_results=args.trust_results, skip=args.skip)
    if args.work_dir is None:
        print("error: give the student's work directory (or --class STUDENTS_CSV for a class).", file=sys.stderr)
        return 2

    _os.environ.setdefault("KIT_HEADLESS", "1")
    quiet_libraries()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(CHECK_NAMES):
        print(f"error: --skip names {sorted(skip - set(CHECK_NAMES))}; the checks are {', '.join(CHECK_NAMES)}.",
              file=sys.stderr)
        return 2
    checks = check_work(args.work_dir, args.name, args.publish, recompute=not args.trust_results)
    checks = [Check(c.name, "SKIP", "skipped (--skip)") if c.name in skip else c for c in checks]
    print_checks(checks)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps([vars(c) for c in checks], ensure_ascii=False, indent=1) + "\n")
    failed = [c.name for c in checks if c.status == "FAIL"]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0
