"""The headless runner: parameters reach the notebooks, failures name notebook and cell."""
import ast
import json
import subprocess
import sys

import nbformat

NAME = "Zoë·张伟 🎓"


def run(*args):
    return subprocess.run([sys.executable, "-m", "helpers", "run", *args], capture_output=True, text=True, timeout=900)


def test_run_00_01_with_a_unicode_name(tmp_path):
    r = run("--work-dir", str(tmp_path), "--only", "00,01", "-p", "name", NAME, "-p", "repeats", "40",
            "-p", "general_ratio", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "00_environment.ipynb" in r.stdout and "ok" in r.stdout
    records = json.loads((tmp_path / "data" / "personal_assistant.json").read_text(encoding="utf-8"))
    assert len(records) == 40
    assert all(rec["conversation"][0]["output"].startswith(f"我是{NAME}的小助手") for rec in records)
    assert json.loads((tmp_path / "results" / "01_data_generation.json").read_text())["name"] == NAME
    executed = nbformat.read(tmp_path / "executed" / "01_data_generation.ipynb", 4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected
    assigned = {t.targets[0].id: ast.literal_eval(t.value) for t in ast.parse(injected[0].source).body}
    assert assigned["name"] == NAME and assigned["repeats"] == 40
    # headless output stays readable: no widget outputs from progress bars
    for nb in (tmp_path / "executed").glob("*.ipynb"):
        for cell in nbformat.read(nb, 4).cells:
            for out in cell.get("outputs", []):
                assert "application/vnd.jupyter.widget-view+json" not in out.get("data", {})


def test_failure_names_notebook_and_cell_and_keeps_it(tmp_path):
    r = run("--work-dir", str(tmp_path), "--only", "00,01", "-p", "output_format", "yaml")
    assert r.returncode == 1
    assert "01_data_generation.ipynb failed in cell" in r.stderr
    assert "output_format is 'yaml'" in r.stderr
    assert (tmp_path / "executed" / "01_data_generation.ipynb").exists()
    assert "FAILED" in r.stdout


def test_unknown_notebook_number_is_refused(tmp_path):
    r = run("--work-dir", str(tmp_path), "--only", "42")
    assert r.returncode != 0 and "--only names ['42']" in r.stderr


def test_a_class_run_with_only_hands_each_student_only_the_selected_notebooks_parameters(tmp_path, tiny_model_dir):
    """The CSV's name belongs to 01: a class run of --only 00 must not hand it on, or the student's run refuses it."""
    import yaml

    students = tmp_path / "students.csv"
    students.write_text("student_id,name,repeats\ns01,Ada,40\n", encoding="utf-8")
    r = run("--class", str(students), "--work-dir", str(tmp_path / "class"), "--only", "00",
            "-p", "base_model", str(tiny_model_dir))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    handed = yaml.safe_load((tmp_path / "class" / "_logs" / "run" / "s01.yaml").read_text(encoding="utf-8"))
    assert handed == {"base_model": str(tiny_model_dir)}
    assert (tmp_path / "class" / "s01" / "executed" / "00_environment.ipynb").exists()
