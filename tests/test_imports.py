"""The helpers import one way: runner -> classroom -> notebooks/progress/paths, homework -> classroom, report ->
results; no module imports one that imports it back (function-level imports included)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parent.parent / "helpers"
TOOLING = ["runner", "classroom", "homework", "report", "notebooks", "progress", "results", "paths"]


def import_graph() -> dict[str, set[str]]:
    """helpers module -> the helpers modules it imports anywhere in its text; a package (helpers/train/) is one
    module, its files' imports of each other left out."""
    sources = {p.stem: [p] for p in HELPERS.glob("*.py")}
    sources |= {d.name: sorted(d.glob("*.py")) for d in HELPERS.iterdir() if (d / "__init__.py").exists()}
    graph = {}
    for name, paths in sources.items():
        deps = set()
        for path in paths:
            up = 1 if path.parent == HELPERS else 2  # the level of `from .x` / `from ..x` that means helpers.x
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level == up:
                    deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers."):
                    deps.add(node.module.split(".")[1])
                elif isinstance(node, ast.Import):
                    deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("helpers.")}
        graph[name] = (deps & set(sources)) - {name}
    return graph


def reaches(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_course_tooling_has_no_import_cycle():
    graph = import_graph()
    assert {"classroom", "report"} <= graph["runner"] and "classroom" in graph["homework"]  # the graph is read
    cycles = [m for m in TOOLING if m in reaches(graph, m)]
    assert not cycles, f"these modules import themselves back through others: {cycles}"


def test_no_helpers_module_imports_itself_back():
    graph = import_graph()
    assert "distributed" in graph["train"] and "terminal" in graph["vlm_chat"]  # the graph is read
    cycles = sorted(m for m in graph if m in reaches(graph, m))
    assert not cycles, f"these modules import themselves back through others: {cycles}"


@pytest.mark.parametrize("module", ["runner", "classroom", "homework", "report"])  # the former circle
def test_each_module_imports_alone(module):
    got = subprocess.run([sys.executable, "-c", f"import helpers.{module}"], capture_output=True, text=True,
                         cwd=HELPERS.parent, timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]
