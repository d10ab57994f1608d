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
    assert "dataset:" not in checks["s01"]["reason"] and "merge: " in checks["s01"]["reason"]
    assert "notebook 03_merge did not run" in checks["s01"]["reason"]
    assert checks["s02"]["reason"].startswith("dataset: ") and "01_data_generation did not run" in checks["s02"]["reason"]
    verdicts = json.loads((class_dir / "_logs" / "check" / "s03.json").read_text(encoding="utf-8"))
    by_name = {c["name"]: c for c in verdicts}
    assert by_name["vlm"]["status"] == "SKIP"
    assert by_name["dataset"]["status"] == "PASS" and "'Alice'" in by_name["dataset"]["reason"]


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
    ('student_id,name\na,"Ann\nLee"\n', r"the name of a holds the control character '\\n' \(a line break"),
    ("student_id,name\na,Ann\x00\n", r"the name of a holds the control character '\\x00'"),
    ("student_id,name\na," + "A" * 1001 + "\n", "the name of a is 1001 characters long; shorten it to at most 1000"),
    ("student_id,name,remote_url\na,B,https://SECRET-TOKEN@hub.example/a/m.git\n",
     "line 2: remote_url https://hub.example/a/m.git has"),
])
def test_a_bad_class_file_is_one_sentence_naming_the_line(tmp_path, text, problem):
    path = tmp_path / "students.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ClassFileError, match=problem) as raised:
        read_class(path, known={"work_dir", "name", "general_ratio", "remote_url"})
    assert "SECRET-TOKEN" not in str(raised.value)


def test_a_token_in_a_class_runs_parameters_reaches_no_file(tmp_path, capsys):
    path = tmp_path / "students.csv"
    path.write_text("student_id,name\na,B\n", encoding="utf-8")
    assert main(["run", "--class", str(path), "--work-dir", str(tmp_path / "c"),
                 "-p", "remote_url", "https://SECRET-TOKEN@hub.example/a/m.git"]) == 2
    err = capsys.readouterr().err
    assert "COURSE_HUB_TOKEN" in err and "SECRET-TOKEN" not in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and "SECRET-TOKEN" in p.read_text(errors="ignore")
                and p != path]


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


# ---------------------------------------------------------------- Ctrl-C: the teacher stops a class run
def _wait_for(condition, what: str, timeout: float = 180):
    """Poll `condition` until it holds (a bound, so a broken run fails the test instead of hanging it)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = condition()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def _attempts(logs: Path) -> list[int]:
    """The pid of every student process a class run started (each attempt's header in the logs)."""
    return [int(p) for log in sorted(logs.glob("*.log"))
            for p in re.findall(r"^=== attempt \d+ of \d+ \(pid (\d+)\)", log.read_text(encoding="utf-8"), re.M)]


def _gone(pids) -> bool:
    import psutil

    return not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def _ctrl_c(proc) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the foreground process group (the class run's)."""
    import signal

    os.killpg(proc.pid, signal.SIGINT)


def _default_signals() -> None:
    """In the child: SIGINT and SIGTERM as a terminal's foreground job has them; an ignored signal would otherwise
    be inherited from whatever ran pytest (or from a library in this process that ignores it)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _start(argv: list[str], out: Path):
    import subprocess

    return subprocess.Popen(argv, cwd=Path(__file__).resolve().parent.parent, stdout=out.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True,  # a process group, as in a terminal
                            preexec_fn=_default_signals)


def test_ctrl_c_stops_a_class_run_starts_nobody_and_writes_the_summary(tmp_path, tiny_model_dir):
    students = tmp_path / "students.csv"
    students.write_text("student_id,name\ns1,小红\ns2,小刚\ns3,Alice\ns4,Bob\n", encoding="utf-8")
    class_dir, out = tmp_path / "class", tmp_path / "out.txt"
    run = _start([sys.executable, "-m", "helpers", "run", "--class", str(students), "--work-dir", str(class_dir),
                  "--only", "00", "--workers", "2", "-p", "base_model", str(tiny_model_dir)], out)
    logs = class_dir / "_logs" / "run"
    try:
        # Both workers' students inside their notebook: then the teacher presses Ctrl-C once.
        _wait_for(lambda: logs.exists() and sum("running 00_environment.ipynb" in p.read_text(encoding="utf-8")
                                                for p in logs.glob("*.log")) == 2, "two students running")
        _ctrl_c(run)
        assert run.wait(timeout=180) == 130
    finally:
        run.kill()
    text = out.read_text(encoding="utf-8")
    assert "Ctrl-C: stopping the 2 running student(s); 2 waiting will not start" in text
    assert "class summary (0 of 4 passed, 4 interrupted)" in text
    started = _attempts(logs)
    assert len(started) == 2  # no retry, and the two waiting students never started
    assert _gone(started)
    with open(class_dir / "class_summary.csv", encoding="utf-8") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f)}
    assert {r["status"] for r in rows.values()} == {"interrupted"}
    reasons = sorted(r["reason"] for r in rows.values())
    assert reasons == ["not started: the class run was interrupted (Ctrl-C)"] * 2 + \
                      ["stopped: the class run was interrupted (Ctrl-C)"] * 2
    assert sorted(r["attempts"] for r in rows.values()) == ["0", "0", "1", "1"]
    assert {r["notebooks"] for r in rows.values()} == {"0/1"}  # a notebook cut off half-way did not run


STUBBORN = """
import json, signal, sys, time
from pathlib import Path
from helpers.classroom import Task, live, run_local, run_slurm, SlurmOptions

engine, folder = sys.argv[1], Path(sys.argv[2])
live.STOP_GRACE_S = 600  # read by live._watch; only a second Ctrl-C ends the wait for students that ignore SIGTERM
# Each student ignores SIGTERM and says when it is up; it would sleep far past the test's bounds.
script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(900)"
tasks = [Task(s, s, [sys.executable, "-c", script], str(folder / f"{s}.log"), str(folder / f"{s}.json"))
         for s in ("s1", "s2", "s3")]
if engine == "local":
    results = run_local(tasks, workers=2)
else:
    results = run_slurm(tasks, SlurmOptions(cluster="local", gpus=0, max_parallel=3), folder / "slurm")
# The results go to a file of their own: on Ctrl-C, submitit's local controller (in the same process group) prints
# its own KeyboardInterrupt to this shared stdout, and that text can land anywhere in it.
(folder / "results.json").write_text(json.dumps(results))
"""


def test_a_second_ctrl_c_quits_at_once_and_kills_the_students(tmp_path):
    out = tmp_path / "out.txt"
    run = _start([sys.executable, "-c", STUBBORN, "local", str(tmp_path)], out)
    try:
        _wait_for(lambda: sum("up" in p.read_text() for p in tmp_path.glob("s*.log")) == 2, "two students up")
        _ctrl_c(run)
        _wait_for(lambda: "Ctrl-C: stopping the 2 running student(s)" in out.read_text(), "the first Ctrl-C")
        started = _attempts(tmp_path)
        assert len(started) == 2 and not _gone(started)  # they ignore SIGTERM: the run waits for them
        _ctrl_c(run)
        assert run.wait(timeout=60) == 130
    finally:
        run.kill()
    assert "Ctrl-C again: stopped at once; no summary written." in out.read_text()
    assert not (tmp_path / "results.json").exists()
    _wait_for(lambda: _gone(started), "the students to be killed", timeout=30)
    assert len(_attempts(tmp_path)) == 2


def test_ctrl_c_cancels_a_slurm_job_array_through_submitit(tmp_path):
    """submitit's local executor stands in for Slurm: the same job array, cancelled through submitit."""
    out = tmp_path / "out.txt"
    run = _start([sys.executable, "-c", STUBBORN, "slurm", str(tmp_path)], out)
    try:
        _wait_for(lambda: sum("up" in p.read_text() for p in tmp_path.glob("s*.log")) == 3, "the students up")
        started = _attempts(tmp_path)
        _ctrl_c(run)
        assert run.wait(timeout=120) == 0
    finally:
        run.kill()
    text = out.read_text()
    assert "Ctrl-C: cancelled job array" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["interrupted"], r["attempts"]) for r in results] == [(True, 1)] * 3
    # The cancelled jobs take their students with them (the students ignore SIGTERM), and nothing is retried.
    _wait_for(lambda: _gone(started), "the cancelled jobs' students to end", timeout=60)
    assert len(_attempts(tmp_path)) == 3


JOB = """
import sys
from pathlib import Path
from helpers.classroom import Task
from helpers.classroom.tasks import run_task

folder = Path(sys.argv[1])
script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(900)"
run_task(Task("s1", "s1", [sys.executable, "-c", script], str(folder / "s1.log"), str(folder / "s1.json")))
"""


def test_a_slurm_job_killed_outright_takes_its_student_along(tmp_path):
    """A job process SIGKILLed before it could stop its student (submitit's local controller kills a cancelled
    job 1 s after its SIGINT; Slurm after its grace time): the student, which ignores SIGTERM, still ends."""
    import signal

    job = _start([sys.executable, "-c", JOB, str(tmp_path)], tmp_path / "out.txt")
    try:
        log = tmp_path / "s1.log"
        _wait_for(lambda: log.exists() and "up" in log.read_text(encoding="utf-8"), "the student up")
        started = _attempts(tmp_path)
        assert len(started) == 1 and not _gone(started)
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        job.kill()
    _wait_for(lambda: _gone(started), "the student to end with its job", timeout=30)


# ---------------------------------------------------------------- any name a student can have
NAMES = {  # student_id: (as written in the CSV, the name the student gets)
    "dash": ("-Ann", "-Ann"),
    "number": ("007", "007"),  # text, though it reads as a number
    "quotes": ("  O'Brien \"Bo\" `x`  ", "O'Brien \"Bo\" `x`"),  # a CSV cell's padding is not part of the name
    "emoji_rtl": ("🦊 مريم דוד 👩‍💻", "🦊 مريم דוד 👩‍💻"),
    "long": ("小" * 100 + "Ann" * 33 + "!", "小" * 100 + "Ann" * 33 + "!"),  # 200 characters
    "path": ("../../outside/evil\\x | <b>&amp;</b>", "../../outside/evil\\x | <b>&amp;</b>"),
}


def test_any_name_works_through_the_class_run_the_check_the_report_and_the_model_card(tmp_path, tiny_model_dir,
                                                                                     capsys):
    import html

    from helpers.homework import CHECK_NAMES
    from helpers.paths import work as make_work
    from helpers.publish import model_card
    from helpers.report import build_report

    assert len(NAMES["long"][1]) == 200
    students = tmp_path / "class.csv"
    with open(students, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student_id", "name"])
        writer.writerows([sid, written] for sid, (written, _) in NAMES.items())
    class_dir = tmp_path / "class"
    rc = main(["run", "--class", str(students), "--work-dir", str(class_dir), "--only", "00,01", "--workers", "2",
               "-p", "base_model", str(tiny_model_dir), "-p", "repeats", "20"])
    out = capsys.readouterr().out
    assert rc == 0, out
    with open(class_dir / "class_summary.csv", encoding="utf-8") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f)}
    assert {sid: (r["name"], r["status"]) for sid, r in rows.items()} == {
        sid: (name, "passed") for sid, (_, name) in NAMES.items()}

    # The check gets each name as the one argument --name=VALUE, whatever it starts with.
    others = ",".join(c for c in CHECK_NAMES if c != "dataset")  # what needs notebooks 02-06
    assert main(["homework", "check", str(class_dir), "--class", str(students), "--workers", "2",
                 "--skip", others]) == 0
    with open(class_dir / "class_check.csv", encoding="utf-8") as f:
        checks = {r["student_id"]: r for r in csv.DictReader(f)}
    for sid, (_, name) in NAMES.items():
        assert (checks[sid]["status"], checks[sid]["attempts"]) == ("passed", "1"), checks[sid]
        verdicts = json.loads((class_dir / "_logs" / "check" / f"{sid}.json").read_text(encoding="utf-8"))
        dataset = next(c for c in verdicts if c["name"] == "dataset")
        assert dataset["status"] == "PASS" and repr(name) in dataset["reason"]

        work = make_work(class_dir / sid, create=False)
        result = json.loads(work.result("01_data_generation").read_text(encoding="utf-8"))
        assert result["name"] == name and name in result["answer"]
        index = build_report(work.root)
        assert f"Homework report: {html.escape(name)}&#x27;s assistant" in index.read_text(encoding="utf-8")
        assert f"# Homework report: {name}'s assistant" in index.with_name("index.md").read_text(encoding="utf-8")
        assert result["answer"] in model_card(work, "assistant")
    md = (class_dir / "class_summary.md").read_text(encoding="utf-8")
    assert "| dash | -Ann | passed |" in md and "| path | ../../outside/evil\\x \\| <b>&amp;</b> | passed |" in md
    # A name is never a path: everything the run wrote is inside the class directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class", "class.csv"]
    assert sorted(p.name for p in class_dir.iterdir()) == sorted(["_logs", "class_check.csv", "class_check.md",
                                                                  "class_summary.csv", "class_summary.md", *NAMES])
    assert not list(class_dir.rglob("evil")) and not list(class_dir.rglob("outside"))
