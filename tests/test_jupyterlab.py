"""What a student sees in JupyterLab: one file per notebook in the file browser (the paired .py sources hidden by
the settings the course installs), and notebook 00's tables whole and readable."""
from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest

from helpers.notebooks import JUPYTER_SETTINGS, install_jupyter_settings, sources
from helpers.paths import NOTEBOOKS_DIR, REPO_ROOT

TOKEN = "course-test"


def contents(server: str, path: str, model: dict | None = None) -> dict:
    """GET (or, with a model, PUT) `path` through the server's contents REST API."""
    request = urllib.request.Request(f"{server}/api/contents/{path}", method="PUT" if model else "GET",
                                     data=json.dumps(model).encode() if model else None,
                                     headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.load(r)


@pytest.fixture
def jupyter_lab(tmp_path, local_servers):
    """start(cwd, *args) runs `jupyter lab` as the README does, with only the settings install_jupyter_settings put
    in a fresh environment prefix (JUPYTER_CONFIG_PATH points there), and returns the server's URL."""
    prefix = tmp_path / "prefix"
    install_jupyter_settings(prefix)
    env = os.environ | {"JUPYTER_CONFIG_PATH": str(prefix / "etc" / "jupyter"),
                        "JUPYTER_CONFIG_DIR": str(tmp_path / "user-config"),  # the user's own settings stay out
                        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}

    def start(cwd: Path, *args: str) -> str:
        argv = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--port={port}",
                f"--IdentityProvider.token={TOKEN}", "--ServerApp.allow_root=True", *args]
        return local_servers(argv, "lab", lambda url: contents(url, "") is not None, cwd=cwd, env=env)

    return start


def listed(listing: dict) -> set[str]:
    return {item["name"] for item in listing["content"]}


def test_the_file_browser_lists_one_file_per_notebook(jupyter_lab):
    server = jupyter_lab(REPO_ROOT, "notebooks/")  # as the README starts it
    names = listed(contents(server, ""))
    books = {p.with_suffix(".ipynb").name for p in sources()}
    assert len(books) >= 7 and books <= names
    assert not [n for n in names if n.endswith(".py")], names
    # the pair stays whole for reviewers and jupytext: the source is still served when asked for by name
    assert contents(server, "00_environment.py?content=0")["name"] == "00_environment.py"


def test_the_settings_hold_wherever_jupyterlab_starts(jupyter_lab, tmp_path):
    """Started in a copy of notebooks/ with no folder given: one file per notebook there too, and saving a
    notebook through the server still writes its paired .py (jupytext), so the pair stays in step."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for p in NOTEBOOKS_DIR.glob("01_data_generation.*"):
        shutil.copy(p, folder / p.name)
    (folder / "__pycache__").mkdir()
    server = jupyter_lab(folder)
    assert listed(contents(server, "")) == {"01_data_generation.ipynb"}  # jupyter's own hidden globs apply too

    notebook = contents(server, "01_data_generation.ipynb")["content"]
    code = next(c for c in notebook["cells"] if "repeats = 2000" in c["source"])
    code["source"] = code["source"].replace("repeats = 2000", "repeats = 1999")
    contents(server, "01_data_generation.ipynb", {"type": "notebook", "format": "json", "content": notebook})
    assert "repeats = 1999" in (folder / "01_data_generation.py").read_text(encoding="utf-8")


def test_installing_the_settings_keeps_what_the_environment_had(tmp_path):
    target = tmp_path / "etc" / "jupyter" / "jupyter_server_config.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps({"ServerApp": {"port": 9999}, "ContentsManager": {"hide_globs": ["*.bak"]}}))
    assert install_jupyter_settings(tmp_path) == target
    install_jupyter_settings(tmp_path)  # twice: nothing doubles
    settings = json.loads(target.read_text())
    ours = json.loads(JUPYTER_SETTINGS.read_text())["ContentsManager"]["hide_globs"]
    assert settings["ServerApp"] == {"port": 9999}
    assert settings["ContentsManager"]["hide_globs"] == ["*.bak", *ours]


def test_a_broken_settings_file_is_one_sentence_and_left_alone(tmp_path):
    target = tmp_path / "etc" / "jupyter" / "jupyter_server_config.json"
    target.parent.mkdir(parents=True)
    target.write_text('{"ServerApp": {\n  "port": }\n')
    with pytest.raises(SystemExit) as err:
        install_jupyter_settings(tmp_path)
    assert str(err.value) == f"error: {target}: line 2: not valid JSON; fix or remove it, then run again."
    assert target.read_text() == '{"ServerApp": {\n  "port": }\n'


# ---------------------------------------------------------------- notebook 00's tables
def test_the_preflight_table_shows_every_word():
    from helpers.environment import preflight_table

    rows = [{"check": "GPU / 4-bit QLoRA", "status": "✗",
             "found": "no CUDA GPU: training uses 16/32-bit LoRA instead of 4-bit",
             "fix": "a CUDA GPU and pip install -e .[gpu]",
             "affects": "02 and 05 with a real model (the tiny course runs without)"}]
    html = preflight_table(rows)._repr_html_()
    for text in rows[0].values():
        assert text in html
    assert "..." not in html and "pre-wrap" in html


def test_the_training_plan_is_rows_of_the_environment_table_not_a_dict():
    from helpers.environment import environment_table

    facts = {"python": "3.11.7", "training_plan": {"attention": "block mask: no CUDA GPU", "layers": "eager"},
             "preflight": [{"check": "git"}], "recommendation": "CPU only: run the course on the embedded tiny model "
                                                                "(minutes); a real 1.8B model needs a GPU."}
    table = environment_table(facts)
    assert list(table.data.index) == ["python", "training_plan: attention", "training_plan: layers", "recommendation"]
    html = table._repr_html_()
    assert "{" not in html.split("</style>")[-1] and facts["recommendation"] in html
