"""Class runs: every student into their own work dir; one broken student fails clearly and alone."""
from __future__ import annotations

import csv
import json

import pytest

from helpers.__main__ import main
from helpers.classroom import ClassFileError, read_class


def test_a_class_of_three_with_one_broken_student(tmp_path, tiny_model_dir, capsys):
    students = tmp_path / "students.csv"
    # The broken student sits in the middle: the one after must still run.
    students.write_text("student_id,name,general_ratio\ns01,小红,\ns02,小刚,2\ns03,Alice,0.1\n", encoding="utf-8")
    class_dir = tmp_path / "class"
    # The base model is built once and shared, so the class costs two short notebooks per student.
    rc = main(["run", "--class", str(students), "--work-dir", str(class_dir), "--only", "00,01",
               "-p", "base_model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "class summary (2 of 3 passed)" in out

    with open(class_dir / "class_summary.csv", encoding="utf-8") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f)}
    assert [rows[s]["status"] for s in ("s01", "s02", "s03")] == ["passed", "FAILED", "passed"]
    assert rows["s02"]["notebooks"] == "1/2"
    assert rows["s02"]["reason"].startswith("01_data_generation.ipynb cell")
    assert "DataError: general_ratio is 2; use a share between 0 and 1" in rows["s02"]["reason"]
    assert rows["s01"]["reason"] == rows["s03"]["reason"] == ""
    assert "| s02 | 小刚 | FAILED |" in (class_dir / "class_summary.md").read_text(encoding="utf-8")

    for sid, name, ratio in (("s01", "小红", 0.2), ("s03", "Alice", 0.1)):
        work = class_dir / sid
        assert rows[sid]["work_dir"] == str(work)
        result = json.loads((work / "results" / "01_data_generation.json").read_text(encoding="utf-8"))
        assert result["name"] == name
        assert result["general_records"] == pytest.approx(result["identity_records"] * ratio / (1 - ratio), abs=2)
        assert name in (work / "data" / "personal_assistant.json").read_text(encoding="utf-8")
        assert name in (work / "report" / "index.html").read_text(encoding="utf-8")  # built after the run
    assert not (class_dir / "s02" / "results" / "01_data_generation.json").exists()


@pytest.mark.parametrize("text, problem", [
    ("id,name\na,B\n", "line 1: the header lacks student_id"),
    ("student_id,name,max_stepz\na,B,3\n", r"line 1: column\(s\) \['max_stepz'\] are not a parameter"),
    ("student_id,name\na,B\na,C\n", "line 3: student_id 'a' is already used on line 2"),
    ("student_id,name\n../x,B\n", "line 2: student_id '../x' cannot name a directory"),
    ("student_id,name\na,\n", "line 2: the name of a is empty"),
    ("student_id,name\n", "no students below the header"),
])
def test_a_bad_class_file_is_one_sentence_naming_the_line(tmp_path, text, problem):
    path = tmp_path / "students.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ClassFileError, match=problem):
        read_class(path, known={"work_dir", "name", "general_ratio"})


def test_a_bad_class_file_runs_nobody(tmp_path, capsys):
    path = tmp_path / "students.csv"
    path.write_text("student_id,name,work_dir\na,B,/tmp/x\n", encoding="utf-8")
    assert main(["run", "--class", str(path), "--work-dir", str(tmp_path / "class"), "--only", "00"]) == 2
    assert "column 'work_dir' is set per student" in capsys.readouterr().err
    assert not (tmp_path / "class" / "a").exists()


def test_parameter_columns_and_empty_cells(tmp_path):
    path = tmp_path / "students.csv"
    path.write_text("\ufeffstudent_id,name,repeats,system\ns1,小红,50,\n\ns2,小刚,,你好\n", encoding="utf-8")
    got = read_class(path)  # checked against the parameters the notebooks really declare
    assert got == [{"student_id": "s1", "name": "小红", "params": {"name": "小红", "repeats": "50"}},
                   {"student_id": "s2", "name": "小刚", "params": {"name": "小刚", "system": "你好"}}]
