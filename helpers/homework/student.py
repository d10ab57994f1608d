"""Student versions of the notebooks: every BEGIN/END SOLUTION region becomes a TODO naming what to set, and
`raise NotImplementedError`."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from ..paths import NOTEBOOKS_DIR

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
_ASSIGNED = re.compile(r"^\s*([A-Za-z_][A-Za-z_0-9]*)\s*(?::[^=]*)?=(?!=)")


class MarkerError(ValueError):
    """Unbalanced solution markers; the message names notebook, cell and line."""


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

    from ..notebooks import CHECK_MARK

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
