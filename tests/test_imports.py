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


SPLIT = ["publish", "report", "xtuner", "chat", "train", "merge", "homework", "classroom"]  # once single files


@pytest.mark.parametrize("package", SPLIT)
def test_the_split_modules_are_packages_of_small_files_by_concern(package):
    """Each file holds one concern, named in the first line of its docstring, in at most ~400 lines."""
    files = sorted((HELPERS / package).glob("*.py"))
    assert not (HELPERS / f"{package}.py").exists() and len(files) > 2, files
    for path in files:
        text = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert doc.strip() and text.startswith('"""'), f"{path} does not open with a docstring saying its concern"
        assert len(text.splitlines()) <= 400, f"{path} has {len(text.splitlines())} lines"


def used_names(package: str) -> set[str]:
    """The names the notebooks, helpers and tests take from helpers.<package>: imported, or read as an attribute."""
    root = HELPERS.parent
    names = set()
    for path in [*(root / "notebooks").glob("*.py"), *HELPERS.rglob("*.py"), *(root / "tests").glob("*.py")]:
        if path.parent in (HELPERS / package, HELPERS / "templates"):  # itself, and files the kit fills in
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in (f"helpers.{package}", package) and (
                    node.module.startswith("helpers.") or node.level):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module == "helpers" and package in {a.name for a in node.names}:
                names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                          and isinstance(n.value, ast.Name) and n.value.id == package}
    return names


@pytest.mark.parametrize("package", SPLIT)
def test_every_name_callers_use_is_still_there(package):
    import importlib.util

    module = importlib.import_module(f"helpers.{package}")
    names = used_names(package)
    sure = {"publish": {"build_model_repo", "PublishError", "file_sha256"}, "report": {"build_report", "CSS"},
            "xtuner": {"import_adapter", "read_projector"}, "chat": {"ChatSession", "load_course_models"},
            "train": {"TrainConfig", "train"}, "merge": {"merge", "require_verified"}, "homework": {"check_work"},
            "classroom": {"Task", "read_class"}}  # names the scan must find, so that it cannot find nothing
    assert sure[package] <= names
    missing = sorted(n for n in names if not hasattr(module, n)
                     and importlib.util.find_spec(f"helpers.{package}.{n}") is None)  # or one of its files
    assert not missing, f"helpers.{package} lost names its callers use: {missing}"


def test_publish_and_report_import_nothing_heavy():
    """A notebook's first import of them stays cheap: huggingface_hub, pandas, jinja2 and torch wait for first use."""
    heavy = "{'torch', 'transformers', 'huggingface_hub', 'pandas', 'jinja2'}"
    code = (f"import sys, helpers; before = {{m.split('.')[0] for m in sys.modules}} & {heavy}; "  # helpers may quiet them
            f"import helpers.publish, helpers.report; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy} - before))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HELPERS.parent, timeout=120)
    assert got.returncode == 0 and got.stdout.strip() == "[]", got.stdout + got.stderr[-2000:]
