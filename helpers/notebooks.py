"""Notebook sources: notebooks/NN_*.py (jupytext py:percent) are the text a person edits and reviews;
`python -m helpers notebooks` writes the paired .ipynb, keeping outputs only in cells marked
NBVAL_CHECK_OUTPUT (the ones nbval compares)."""
from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

from .paths import NOTEBOOKS_DIR, REPO_ROOT

CHECK_MARK = "NBVAL_CHECK_OUTPUT"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
# The Jupyter server settings the course ships: the file browser hides the paired NN_*.py sources
JUPYTER_SETTINGS = REPO_ROOT / "jupyter-config" / "jupyter_server_config.json"


def course_notebooks(only: list[str] | None = None) -> list[Path]:
    """notebooks/NN_*.ipynb in order; `only` keeps those whose number (or stem) is listed."""
    books = sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {o.strip() for o in only if o.strip()}
        unknown = wanted - {p.name[:2] for p in books} - {p.stem for p in books}
        if unknown:
            raise SystemExit(f"error: --only names {sorted(unknown)}, but notebooks/ has "
                             f"{', '.join(p.name[:2] for p in books)}; use those numbers.")
        books = [p for p in books if p.name[:2] in wanted or p.stem in wanted]
    return books


def notebook_parameters() -> dict[str, list[str]]:
    """Each course notebook's number -> the parameters its first code cell declares."""
    import papermill as pm

    return {nb.name[:2]: list(pm.inspect_notebook(str(nb))) for nb in course_notebooks()}


def sources() -> list[Path]:
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))


def _read_py(py: Path):
    import jupytext

    nb = jupytext.read(py)
    seen: set[str] = set()
    for cell in nb.cells:  # ids from the cell's text, so rebuilding an unchanged notebook changes nothing
        cid = hashlib.sha1(cell.source.encode()).hexdigest()[:12]
        while cid in seen:
            cid = hashlib.sha1(cid.encode()).hexdigest()[:12]
        seen.add(cid)
        cell.id = cid
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    return nb


def _cell_sources(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells]


def out_of_sync() -> list[str]:
    """Names of notebooks whose .ipynb cells differ from their .py source (or are missing)."""
    import nbformat

    bad = []
    for py in sources():
        ipynb = py.with_suffix(".ipynb")
        if not ipynb.exists() or _cell_sources(nbformat.read(ipynb, 4)) != _cell_sources(_read_py(py)):
            bad.append(ipynb.name)
    return bad


def build(with_outputs: bool = True, only: list[str] | None = None) -> list[Path]:
    """Write notebooks/*.ipynb from the .py sources; run them in order, in one temporary work dir, to store
    the checked cells' outputs (`only` limits which are written; the ones before them still run)."""
    import nbformat
    import papermill as pm

    written = []
    with tempfile.TemporaryDirectory() as tmp:
        books = sources()
        last = max((i for i, py in enumerate(books) if not only or py.name[:2] in only), default=-1)
        for py in books[: last + 1]:
            wanted = not only or py.name[:2] in only
            nb = _read_py(py)
            ipynb = py.with_suffix(".ipynb") if wanted else Path(tmp) / f"source-{py.stem}.ipynb"
            nbformat.write(nb, ipynb)
            if not (with_outputs or wanted):
                continue
            if with_outputs:  # earlier notebooks run too (in one work dir), since each builds on the ones before
                executed = Path(tmp) / ipynb.name
                pm.execute_notebook(str(ipynb), str(executed), parameters={"work_dir": str(Path(tmp) / "work")},
                                    cwd=str(NOTEBOOKS_DIR), kernel_name="python3", progress_bar=False)
                ran = nbformat.read(executed, 4)
                ran_code = [c for c in ran.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]
                for cell, done in zip([c for c in nb.cells if c.cell_type == "code"], ran_code):
                    if CHECK_MARK in cell.source:
                        cell.outputs = [o for o in done.outputs if o.get("output_type") != "display_data"]
                        cell.execution_count = done.execution_count
            if wanted:
                nbformat.write(nb, ipynb)
                written.append(ipynb)
    return written


def install_jupyter_settings(prefix: str | Path | None = None) -> Path:
    """Add the course's Jupyter server settings to this environment's etc/jupyter/jupyter_server_config.json, where
    JupyterLab reads them wherever it starts (it reads none from the working directory, and jupyter_server_config.d
    holds only extension switches); globs already hidden there stay."""
    import json

    from .data import atomic_write_text

    target = Path(prefix or sys.prefix) / "etc" / "jupyter" / JUPYTER_SETTINGS.name
    try:
        current = json.loads(target.read_text(encoding="utf-8")) if target.exists() else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {target}: line {e.lineno}: not valid JSON; fix or remove it, then run again.") from None
    ours = json.loads(JUPYTER_SETTINGS.read_text(encoding="utf-8"))["ContentsManager"]["hide_globs"]
    kept = current.setdefault("ContentsManager", {}).get("hide_globs", [])
    current["ContentsManager"]["hide_globs"] = kept + [glob for glob in ours if glob not in kept]
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(current, indent=2) + "\n")
    return target


def add_command(sub) -> None:
    p = sub.add_parser("notebooks", help="write notebooks/*.ipynb from their .py sources (jupytext)")
    p.add_argument("--check", action="store_true", help="only check that .ipynb and .py agree")
    p.add_argument("--no-outputs", action="store_true", help="do not run the notebooks to store checked outputs")
    p.add_argument("--only", default=None, help="comma-separated notebook numbers")
    p.add_argument("--jupyter-settings", action="store_true",
                   help="only install the course's JupyterLab settings (one file per notebook) in this environment")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.jupyter_settings:
        print(f"wrote {install_jupyter_settings()}: JupyterLab lists each notebook once (its .py source is hidden)")
        return 0
    if args.check:
        bad = out_of_sync()
        if bad:
            print(f"error: {', '.join(bad)} differ from their .py sources; run `python -m helpers notebooks`.", file=sys.stderr)
            return 1
        print("ok: notebooks in sync")
        return 0
    import os

    os.environ["KIT_HEADLESS"] = "1"
    for p in build(with_outputs=not args.no_outputs, only=args.only.split(",") if args.only else None):
        print(f"wrote {p}")
    return 0
