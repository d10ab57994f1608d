"""Class runs: every student into their own work dir; one broken student fails clearly and alone."""
from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path

import pytest

from helpers.__main__ import main
from helpers.classroom import ClassFileError, read_class


def test_a_class_of_three_in_parallel_with_one_broken_student(tmp_path, tiny_model_dir, capsys):
    students = tmp_path / "students.csv"
    # The broken student sits in the middle: the one after must still run.
    students.write_text("student_id,name,general_ratio\ns01,小红,\ns02,小刚,2\ns03,Alice,0.1\n", encoding="utf-8")
    class_dir = tmp_path / "class"
    # Two workers on the CPU, each student its own process; the base model is built once and shared.
    rc = main(["run", "--class", str(students), "--work-dir", str(class_dir), "--only", "00,01,02",
               "--workers", "2", "-p", "base_model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "3 students, 2 at a time on the CPU" in out
    assert "class summary (2 of 3 passed)" in out
    assert "s02  01_data_generation.ipynb  running (attempt 2)" in out  # the live table's lines

    with open(class_dir / "class_summary.csv", encoding="utf-8") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f)}
    assert [rows[s]["status"] for s in ("s01", "s02", "s03")] == ["passed", "FAILED", "passed"]
    assert [rows[s]["attempts"] for s in ("s01", "s02", "s03")] == ["1", "2", "1"]  # a failure is retried once
    assert rows["s02"]["notebooks"] == "1/3" and rows["s01"]["notebooks"] == "3/3"
    assert rows["s02"]["reason"].startswith("01_data_generation.ipynb cell")
    assert "DataError: general_ratio is 2.0; use a share between 0 and 1" in rows["s02"]["reason"]
    assert rows["s01"]["reason"] == rows["s03"]["reason"] == ""
    assert "| s02 | 小刚 | FAILED |" in (class_dir / "class_summary.md").read_text(encoding="utf-8")
    log = (class_dir / "_logs" / "run" / "s02.log").read_text(encoding="utf-8")
    assert log.count("=== attempt") == 2 and "=== attempt 2 of 2" in log

    for sid, name, ratio in (("s01", "小红", 0.2), ("s03", "Alice", 0.1)):
        work = class_dir / sid
        assert rows[sid]["work_dir"] == str(work)
        result = json.loads((work / "results" / "01_data_generation.json").read_text(encoding="utf-8"))
        assert result["name"] == name
        assert result["general_records"] == pytest.approx(result["identity_records"] * ratio / (1 - ratio), abs=2)
        assert (work / "adapter" / "adapter_config.json").exists()
        assert name in (work / "report" / "index.html").read_text(encoding="utf-8")  # built after the run
    assert not (class_dir / "s02" / "results" / "01_data_generation.json").exists()

    # The homework check over the same class, two students at a time; a failed check is a verdict, not retried.
    assert main(["homework", "check", str(class_dir), "--class", str(students), "--workers", "2", "--skip", "vlm"]) == 1
    assert "class check (0 of 3 passed)" in capsys.readouterr().out
    with open(class_dir / "class_check.csv", encoding="utf-8") as f:
        checks = {r["student_id"]: r for r in csv.DictReader(f)}
    assert [checks[s]["attempts"] for s in ("s01", "s02", "s03")] == ["1", "1", "1"]
    assert "dataset:" not in checks["s01"]["reason"] and "merge: notebook 03_merge did not run" in checks["s01"]["reason"]
    assert checks["s02"]["reason"].startswith("dataset: ") and "01_data_generation did not run" in checks["s02"]["reason"]
    verdicts = json.loads((class_dir / "_logs" / "check" / "s03.json").read_text(encoding="utf-8"))
    assert [(c["name"], c["status"]) for c in verdicts][3] == ("vlm", "SKIP")
    assert verdicts[0]["status"] == "PASS" and "'Alice'" in verdicts[0]["reason"]


@pytest.fixture
def slurm():
    """A single-node Slurm: started by .ci/run, or here by .ci/start-slurm where slurm-wlm is installed."""
    import shutil
    import subprocess

    if not shutil.which("sbatch"):
        pytest.skip("no Slurm here (.ci/run installs slurm-wlm and munge and starts them)")
    start = Path(__file__).resolve().parent.parent / ".ci" / "start-slurm"
    if os.geteuid() == 0:
        subprocess.run([str(start)], check=True, timeout=120)
    assert subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0, "Slurm does not answer; see /var/log/slurm/"


def test_a_class_as_a_slurm_job_array(slurm, tmp_path, tiny_model_dir, capsys):
    students = tmp_path / "students.csv"
    students.write_text(f"student_id,name,base_model\na1,小红,\na2,小刚,{tmp_path / 'no-model'}\n", encoding="utf-8")
    class_dir = tmp_path / "class"
    rc = main(["run", "--class", str(students), "--work-dir", str(class_dir), "--only", "00", "--slurm",
               "--max-parallel", "1", "--slurm-cpus", "1", "-p", "base_model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert rc == 1 and "class summary (1 of 2 passed)" in out
    array = re.search(r"submitted as Slurm job array (\d+) \(1 GPU each, at most 1 at once\)", out).group(1)
    with open(class_dir / "class_summary.csv", encoding="utf-8") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f)}
    assert (rows["a1"]["status"], rows["a1"]["attempts"]) == ("passed", "1")
    assert (rows["a2"]["status"], rows["a2"]["attempts"]) == ("FAILED", "2")
    assert rows["a2"]["reason"].startswith("00_environment.ipynb cell") and "no-model" in rows["a2"]["reason"]
    for sid, task in (("a1", 0), ("a2", 1)):  # each student ran as a task of the array, with a GPU Slurm gave it
        assert (class_dir / "_logs" / "slurm" / f"{array}_{task}").is_dir()
        assert "on GPU 0" in (class_dir / "_logs" / "run" / f"{sid}.log").read_text(encoding="utf-8")
    assert (class_dir / "a1" / "results" / "00_environment.json").exists()


def test_bad_class_run_flags_are_one_sentence(tmp_path, capsys):
    path = tmp_path / "students.csv"
    path.write_text("student_id,name\na,B\n", encoding="utf-8")
    assert main(["run", "--class", str(path), "--work-dir", str(tmp_path / "c"), "--workers", "0"]) == 2
    assert "--workers is 0; give 1 or more" in capsys.readouterr().err
    assert main(["run", "--class", str(path), "--slurm", "--slurm-option", "account"]) == 2
    assert "--slurm-option 'account' is not KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "c" / "a").exists()


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


def test_the_pool_hands_each_worker_one_gpu_and_retries_once(tmp_path, monkeypatch):
    from helpers.classroom import Task, run_local

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    flaky = tmp_path / "failed-once"  # the first attempt of s1 fails, the second passes
    script = ("import os, sys, pathlib; print('gpu', os.environ['CUDA_VISIBLE_DEVICES']); "
              f"p = pathlib.Path({str(flaky)!r}); sid = sys.argv[1]; "
              "sys.exit(0 if sid != 's1' or p.exists() else p.touch() or 3)")
    tasks = [Task(sid, sid, [sys.executable, "-c", script, sid], str(tmp_path / f"{sid}.log"),
                  str(tmp_path / f"{sid}.json")) for sid in ("s1", "s2", "s3", "s4")]
    results = run_local(tasks, workers=2)
    assert [r["code"] for r in results] == [0, 0, 0, 0]
    assert [r["attempts"] for r in results] == [2, 1, 1, 1]
    used = set()
    for t in tasks:
        log = Path(t.log).read_text(encoding="utf-8")
        gpus = re.findall(r"^gpu (\S+)$", log, re.M)
        assert gpus and all(f"on GPU {g}:" in log for g in gpus)  # what the header says is what the process saw
        used |= set(gpus)
    assert used == {"3", "5"}
    assert "=== exit code 3" in Path(tasks[0].log).read_text(encoding="utf-8")


def test_students_sharing_a_gpu_each_keep_to_their_share_of_its_memory(tmp_path, monkeypatch):
    from helpers.classroom import Task, run_local
    from helpers.train import GPU_SHARE_ENV

    script = f"import os; print('share', os.environ.get({GPU_SHARE_ENV!r}))"
    for gpus, workers, share in [("0", 2, "0.475"), ("0,1", 2, "None"), ("0,1", 3, "0.475"), ("0", 1, "None")]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus)
        tasks = [Task(sid, sid, [sys.executable, "-c", script], str(tmp_path / f"{gpus}-{workers}-{sid}.log"),
                      str(tmp_path / f"{gpus}-{workers}-{sid}.json")) for sid in ("s1", "s2")]
        run_local(tasks, workers=workers)
        for t in tasks:
            assert f"share {share}" in Path(t.log).read_text(encoding="utf-8"), (gpus, workers)


def test_a_gpu_share_out_of_range_is_one_sentence(monkeypatch):
    import torch

    from helpers.train import GPU_SHARE_ENV, share_gpu

    monkeypatch.setenv(GPU_SHARE_ENV, "1.5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="between 0 and 1"):
        share_gpu()
