"""Class runs: the course (or the homework check) once per student, each student its own process and work
directory, in parallel on a local worker pool or as a Slurm job array.

    python -m helpers run --class students.csv [--work-dir CLASS_DIR] [--workers N] [--only 00,01] [-p NAME VALUE]
    python -m helpers run --class students.csv --slurm [--slurm-partition P] [--max-parallel N]
    python -m helpers homework check CLASS_DIR --class students.csv [--workers N | --slurm ...]

students.csv has the columns student_id and name, plus any notebook parameter (an empty cell keeps the
default). Each student runs `python -m helpers run` (or `homework check`) in a process of their own, one
GPU each where there are GPUs; a failure is retried once, and one student's failure never stops the
others. A live table shows each student's notebook and status; the summary is printed and saved as
CLASS_DIR/class_summary.csv/.md (checks: class_check.csv/.md); logs are in CLASS_DIR/_logs/.

student_id names the student's folder (letters, digits, '_', '-', '.'); name is any text on one line (cells
are stripped of surrounding spaces), passed on as a parameter file and as `--name=VALUE`, never as a path.
Ctrl-C stops the class: no student starts after it, the running ones are stopped (their whole process tree;
on Slurm the job array is cancelled), nothing is retried, and the summary marks them "interrupted" (exit
code 130). A second Ctrl-C quits at once, without a summary.

Engines: concurrent.futures + subprocess on one machine; submitit on Slurm. submitit submits the students
as one job array with a concurrency cap (`--array=0-29%8`), pickles a Python function per task, reads back
its result and has a local executor for machines without Slurm. The alternatives weighed: simple_slurm only
writes sbatch scripts (no results, no waiting), and dask-jobqueue runs long-lived dask workers as jobs,
which a class of independent, hour-long runs does not need.
"""
from __future__ import annotations

import csv
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

try:
    import psutil  # noqa: F401  (loaded now: signal_tree runs while the process is being stopped)
except ImportError:
    pass

from .data import atomic_write_text
from .notebooks import course_notebooks, notebook_parameters
from .paths import work as make_work
from .progress import print_table
from .publish import PublishError, refuse_credentials

REQUIRED = ("student_id", "name")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a directory name
SUMMARY_COLUMNS = ["student_id", "name", "status", "notebooks", "reason", "seconds", "attempts", "work_dir"]
CHECK_COLUMNS = ["student_id", "name", "status", "checks", "reason", "seconds", "attempts", "work_dir"]
LOGS = "_logs"  # inside the class directory; no student_id can start with "_"
MAX_NAME = 1000  # characters: a name goes on a command line (--name=) and into every answer the model learns
STOP_GRACE_S = 30  # after the first Ctrl-C, students still running this long are killed


class ClassFileError(ValueError):
    """A bad students CSV; the message names the file, line and column, and the fix."""


def declared_parameters() -> set[str]:
    """Every parameter some course notebook declares."""
    import papermill as pm

    return {name for nb in course_notebooks() for name in pm.inspect_notebook(str(nb))}


def read_class(csv_path: str | Path, known: set[str] | None = None) -> list[dict]:
    """The students of a class CSV: [{"student_id", "name", "params": {...}}], checked before anyone runs."""
    path = Path(csv_path)
    if not path.is_file():
        raise ClassFileError(f"{path}: no such file; give a CSV with the columns student_id,name (+ parameters).")
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")))  # -sig: Excel writes a BOM
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ClassFileError(f"{path}: line 1: the header lacks {', '.join(missing)}; "
                             f"start the file with 'student_id,name' (then any parameter columns).")
    extra = [h for h in header if h not in REQUIRED]
    if "work_dir" in extra:
        raise ClassFileError(f"{path}: line 1: column 'work_dir' is set per student by the class run; drop that column.")
    known = declared_parameters() if known is None else known
    unknown = [h for h in extra if h not in known]
    if unknown:
        raise ClassFileError(f"{path}: line 1: column(s) {unknown} are not a parameter of any notebook; "
                             f"fix the spelling or drop them (parameters: {', '.join(sorted(known - {'work_dir'}))}).")
    students, seen = [], {}
    for line, row in enumerate(reader, 2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if not any(row.values()):
            continue
        sid, name = row.get("student_id", ""), row.get("name", "")
        if not SAFE_ID.match(sid):
            raise ClassFileError(f"{path}: line {line}: student_id {sid!r} cannot name a directory; use letters, "
                                 f"digits, '_', '-' or '.', starting with a letter or digit.")
        if sid in seen:
            raise ClassFileError(f"{path}: line {line}: student_id {sid!r} is already used on line {seen[sid]}; "
                                 f"give every student their own id.")
        if not name:
            raise ClassFileError(f"{path}: line {line}: the name of {sid} is empty; write the student's name.")
        control = next((c for c in name if unicodedata.category(c) == "Cc"), None)
        if control is not None:
            raise ClassFileError(f"{path}: line {line}: the name of {sid} holds the control character {control!r} "
                                 f"(a line break, tab or NUL); write the name on one line without it.")
        if len(name) > MAX_NAME:
            raise ClassFileError(f"{path}: line {line}: the name of {sid} is {len(name)} characters long; shorten it "
                                 f"to at most {MAX_NAME}.")
        seen[sid] = line
        params = {k: v for k, v in row.items() if k in extra and v != ""}
        try:  # a token in a URL cell would reach the student's parameter file and executed notebooks
            refuse_credentials(params)
        except PublishError as e:
            raise ClassFileError(f"{path}: line {line}: {e}") from None
        students.append({"student_id": sid, "name": name, "params": {"name": name, **params}})
    if not students:
        raise ClassFileError(f"{path}: no students below the header; add one line per student.")
    return students


def failure_reason(work, notebooks: list[Path], since: float) -> tuple[int, str]:
    """How many notebooks ran through since `since`, and the first error in the executed copies."""
    import nbformat

    ran = 0
    for nb in notebooks:
        out = work.executed / nb.name
        if not out.exists() or out.stat().st_mtime < since:
            return ran, f"{nb.name} did not run"
        executed = nbformat.read(out, as_version=4)
        for i, cell in enumerate(executed.cells):
            for o in cell.get("outputs", []):
                if o.get("output_type") == "error":
                    evalue = (o.get("evalue") or "").strip().splitlines()
                    return ran, f"{nb.name} cell {cell.get('execution_count') or i + 1}: {o.get('ename')}: {evalue[0] if evalue else ''}"
        ran += 1
    return ran, ""


def class_root(work_dir=None) -> Path:
    """The class directory: --work-dir, else ./work/class."""
    return make_work(work_dir).root if work_dir else make_work().root / "class"


class ClassRunError(ValueError):
    """A class run that cannot start (bad --workers, no Slurm here); the message says what to change."""


# ---------------------------------------------------------------- one student's task (in the pool or on a Slurm node)
RUNNING = re.compile(r"^running (\S+\.ipynb) \.\.\.")  # the runner's line as it starts a notebook


@dataclass
class Task:
    """One student's command, run until its exit code is in `final_codes`, at most `attempts` times."""
    student_id: str
    name: str
    argv: list[str]
    log: str  # every attempt's output
    status: str  # a small JSON file the live table reads (a file, so that a Slurm node can write it too)
    total: int = 1  # notebooks in the run
    final_codes: tuple[int, ...] = (0,)
    attempts: int = 2
    env: dict = field(default_factory=dict)


def _write_status(task: Task, **status) -> None:
    atomic_write_text(Path(task.status), json.dumps(status))


def _read_status(task: Task) -> dict:
    try:
        return json.loads(Path(task.status).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"state": "queued", "notebook": "", "done": 0, "attempt": 0}


def signal_tree(pid: int, sig: int) -> None:
    """`sig` to a student's process group and to the groups of every process below it (a notebook's kernel starts
    a session of its own)."""
    groups = {pid}
    try:
        import psutil  # ipykernel's own dependency (imported with the kit: a kill must not wait for an import)

        for child in psutil.Process(pid).children(recursive=True):
            try:
                groups.add(os.getpgid(child.pid))
            except OSError:
                pass
    except Exception:  # psutil missing or the student already gone: its own group still gets the signal
        pass
    groups.discard(os.getpgrp())  # never the class run itself
    for group in groups:
        try:
            os.killpg(group, sig)
        except OSError:
            pass


class Stop:
    """A class run's stop switch, thrown by the teacher's first Ctrl-C: no student starts after it, the running
    ones are stopped (their whole process tree), and nothing is retried."""

    def __init__(self):
        self.requested = threading.Event()
        self._lock = threading.RLock()  # re-entered when a second Ctrl-C lands while the first is stopping students
        self._running: set = set()

    def popen(self, argv: list[str], **kw) -> subprocess.Popen | None:
        """The student's process in a session of its own, so only the class run hears the terminal's Ctrl-C;
        None once the run is stopping."""
        with self._lock:
            if self.requested.is_set():
                return None
            proc = subprocess.Popen(argv, start_new_session=True, **kw)
            self._running.add(proc)
            return proc

    def finished(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._running.discard(proc)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Throw the switch and send `sig` to every running student; returns how many were running."""
        with self._lock:
            self.requested.set()
            running = list(self._running)
        for proc in running:
            signal_tree(proc.pid, sig)
        return len(running)


def run_task(task: Task, gpu: str | None = None, stop: Stop | None = None) -> dict:
    """Run one student's command in its own process, retrying once on failure: exit code, attempts, times.
    `stop`: the class run's switch; once thrown, the student is stopped and not retried ("interrupted")."""
    stop = stop or Stop()  # on a Slurm node: the job's own, never thrown (cancelling the job ends this call)
    env = {**os.environ, **task.env, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    started = time.time()
    Path(task.log).parent.mkdir(parents=True, exist_ok=True)
    attempt, attempt_started, notebook, done, last, code = 0, 0.0, "", 0, "", None
    for attempt in range(1, task.attempts + 1):
        proc = stop.popen(task.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                          encoding="utf-8", errors="replace")
        if proc is None:
            attempt -= 1
            break
        attempt_started, notebook, done, last = time.time(), "", 0, ""
        _write_status(task, state="running", notebook="", done=0, attempt=attempt)
        with open(task.log, "a", encoding="utf-8") as log:
            where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if env.get("CUDA_VISIBLE_DEVICES") else ""  # ours or Slurm's
            log.write(f"=== attempt {attempt} of {task.attempts} (pid {proc.pid}){where}: {' '.join(task.argv)}\n")
            log.flush()
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    last = line.strip() or last
                    m = RUNNING.match(line)
                    if m:
                        done, notebook = done + bool(notebook), m.group(1)
                        _write_status(task, state="running", notebook=notebook, done=done, attempt=attempt)
                code = proc.wait()
            except BaseException:  # this call itself was stopped (a cancelled Slurm job): the student goes with it
                if threading.current_thread() is threading.main_thread():  # a second signal must not cut this short
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        signal.signal(sig, signal.SIG_IGN)
                signal_tree(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            finally:
                stop.finished(proc)
            log.write(f"=== exit code {code}" + (" (stopped: the class run was interrupted)\n"
                                                  if stop.requested.is_set() else "\n"))
        if code in task.final_codes or attempt == task.attempts or stop.requested.is_set():
            break
        _write_status(task, state="retrying", notebook=notebook, done=done, attempt=attempt)
    interrupted = stop.requested.is_set() and code not in task.final_codes
    state = "interrupted" if interrupted else "passed" if code == 0 else "FAILED"
    _write_status(task, state=state, notebook=notebook, done=task.total if code == 0 else done, attempt=attempt)
    return {"code": code, "attempts": attempt, "seconds": time.time() - started, "attempt_started": attempt_started,
            "last_line": last, "interrupted": interrupted}


# ---------------------------------------------------------------- the live table
class LiveTable:
    """Each student's notebook and status: one tqdm bar per student on a terminal, a line per change elsewhere."""

    def __init__(self, tasks: list[Task]):
        self.width = max(len(t.student_id) for t in tasks)
        self.shown: dict[str, dict] = {}
        self.start = time.time()
        self.bars = {}
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bars = {t.student_id: tqdm(total=t.total, position=i, leave=True, desc=t.student_id.ljust(self.width),
                                            bar_format="{desc} |{bar:12}| {n}/{total}{postfix}")
                         for i, t in enumerate(tasks)}

    def update(self, task: Task, status: dict) -> None:
        if self.shown.get(task.student_id) == status:
            return
        self.shown[task.student_id] = status
        text = f"{status.get('notebook') or '-'}  {status.get('state')}"
        if status.get("attempt", 0) > 1:
            text += f" (attempt {status['attempt']})"
        bar = self.bars.get(task.student_id)
        if bar is not None:
            bar.n = status.get("done", 0)
            bar.set_postfix_str(text)
        else:
            print(f"[{time.time() - self.start:6.0f}s] {task.student_id.ljust(self.width)}  {text}", flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class CtrlC:
    """The teacher's Ctrl-C during a class run: the first is noted (the run stops its students and writes its
    summary), the second calls `at_once` and quits on the spot."""

    def __init__(self, at_once):
        self.at_once, self.pressed, self._previous = at_once, threading.Event(), None

    def __enter__(self) -> "CtrlC":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C stays a KeyboardInterrupt there
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.pressed.is_set():
            self.at_once()
            os.write(2, b"\nCtrl-C again: stopped at once; no summary written.\n")
            os._exit(130)
        self.pressed.set()

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


INTERRUPTED = {"code": None, "attempts": 0, "seconds": 0.0, "attempt_started": 0.0, "last_line": "", "interrupted": True}


def _watch(tasks: list[Task], handles: list, table: LiveTable, ctrl_c: CtrlC, stop_all, force=None) -> list[dict]:
    """Redraw the table until every future/job is done; then their results (a crash becomes a result too).
    After a Ctrl-C, `stop_all()` stops the students (it returns whether to wait for them to end; `force()` kills
    those still running after STOP_GRACE_S), and a student stopped or never started is "interrupted"."""
    stopped_at = None
    try:
        while True:
            if ctrl_c.pressed.is_set() and stopped_at is None:
                stopped_at = time.time()
                if not stop_all():
                    break
            finished = all(h.done() for h in handles)
            for t in tasks:
                table.update(t, _read_status(t))
            if finished:
                break
            if stopped_at is not None and force is not None and time.time() - stopped_at > STOP_GRACE_S:
                force()
                force = None
            time.sleep(1)
    finally:
        table.close()
    results = []
    for t, h in zip(tasks, handles):
        if stopped_at is not None and (isinstance(h, Future) and h.cancelled() or not h.done()):
            results.append(dict(INTERRUPTED, attempts=_read_status(t).get("attempt", 0)))  # started or not
            continue
        try:
            results.append(h.result())
        except Exception as e:  # a job Slurm killed or could not start: that student's failure only
            text = str(e).strip().splitlines()
            results.append({"code": None, "attempts": 0, "seconds": 0.0, "attempt_started": 0.0, "last_line": "",
                            "error": f"{type(e).__name__}: {text[-1] if text else ''}"})
    return results


# ---------------------------------------------------------------- engines: a local pool, a Slurm job array
def visible_gpus() -> list[str]:
    """The GPUs to hand out: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists (none on a CPU machine)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    try:
        got = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in got.stdout.splitlines() if line.strip()] if got.returncode == 0 else []


def run_local(tasks: list[Task], workers: int) -> list[dict]:
    """`workers` students at once on this machine, each with one GPU (round robin) or a share of the CPU cores."""
    gpus = visible_gpus()
    slots: queue.Queue = queue.Queue()
    for i in range(workers):
        slots.put(gpus[i % len(gpus)] if gpus else None)
    sharing = -(-workers // len(gpus)) if gpus else 1  # students at once on the busiest GPU
    if sharing > 1:  # each keeps to its share of the card's memory (helpers.train.share_gpu)
        from .train import GPU_SHARE_ENV

        for t in tasks:
            t.env.setdefault(GPU_SHARE_ENV, f"{0.95 / sharing:.3f}")
    if "OMP_NUM_THREADS" not in os.environ:  # N students on one CPU: split the cores rather than fight for them
        for t in tasks:
            t.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    where = f"GPUs {','.join(gpus)}" if gpus else "the CPU"
    shared = f" ({sharing} per GPU, each with {0.95 / sharing:.0%} of its memory)" if sharing > 1 else ""
    print(f"{len(tasks)} students, {workers} at a time on {where}{shared}", flush=True)

    stop = Stop()

    def one(task: Task) -> dict:
        gpu = slots.get()
        try:
            return run_task(task, gpu, stop)
        finally:
            slots.put(gpu)

    def stop_all() -> bool:
        waiting = sum(f.cancel() for f in futures)
        running = stop.stop()
        print(f"\nCtrl-C: stopping the {running} running student(s); {waiting} waiting will not start "
              f"(Ctrl-C again quits at once).", flush=True)
        return True

    pool, futures = ThreadPoolExecutor(max_workers=workers), []
    try:
        with CtrlC(lambda: stop.stop(signal.SIGKILL)) as ctrl_c:
            futures = [pool.submit(one, t) for t in tasks]
            return _watch(tasks, futures, LiveTable(tasks), ctrl_c, stop_all, lambda: stop.stop(signal.SIGKILL))
    except BaseException:
        stop.stop(signal.SIGKILL)  # whatever ends the run early, no student outlives it
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class SlurmOptions:
    partition: str | None = None
    max_parallel: int = 8  # students running at once (the job array's %N)
    gpus: int = 1  # per student
    cpus: int = 8  # per student
    time_min: int = 240
    mem_gb: int | None = None
    extra: dict = field(default_factory=dict)  # further sbatch options, e.g. {"account": "course"}
    cluster: str = "slurm"  # "local": submitit's local executor, for a machine without Slurm


def run_slurm(tasks: list[Task], options: SlurmOptions, folder: Path) -> list[dict]:
    """The students as one Slurm job array through submitit: one GPU each, at most max_parallel at once."""
    try:
        import submitit
    except ImportError:
        raise ClassRunError("--slurm needs submitit; install it with `pip install submitit`.") from None
    if options.cluster == "slurm" and not shutil.which("sbatch"):
        raise ClassRunError("--slurm needs Slurm's sbatch, which is not on PATH here; run on the cluster's "
                            "login node, or drop --slurm to use this machine's workers.")
    import logging

    logging.getLogger("submitit").setLevel(logging.ERROR)  # its retries of `sacct` would bury the live table
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=options.cluster)
    params = dict(name="course-class", timeout_min=options.time_min, gpus_per_node=options.gpus,
                  cpus_per_task=options.cpus, tasks_per_node=1, slurm_array_parallelism=options.max_parallel)
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.mem_gb:
        params["mem_gb"] = options.mem_gb
    if options.extra:
        params["slurm_additional_parameters"] = dict(options.extra)
    executor.update_parameters(**params)
    jobs = executor.map_array(run_task, tasks)
    print(f"{len(tasks)} students submitted as Slurm job array {jobs[0].job_id.split('_')[0]} "
          f"({options.gpus} GPU each, at most {options.max_parallel} at once); logs: {folder}", flush=True)
    def cancel() -> None:
        for job in jobs:
            job.cancel(check=False)

    def stop_all() -> bool:
        cancel()
        print(f"\nCtrl-C: cancelled job array {jobs[0].job_id.split('_')[0]}; its running students are stopped, "
              f"the waiting ones will not start.", flush=True)
        return False  # Slurm's accounting may take minutes to agree: do not wait for it

    try:
        with CtrlC(cancel) as ctrl_c:
            return _watch(tasks, jobs, LiveTable(tasks), ctrl_c, stop_all)
    except BaseException:
        cancel()
        raise


def _execute(tasks: list[Task], root: Path, workers: int, slurm: SlurmOptions | None) -> list[dict] | None:
    """Every task on the pool or on Slurm; None after one error sentence when the engine cannot start."""
    for t in tasks:  # a fresh run: last time's logs would confuse the table and the summary
        Path(t.log).unlink(missing_ok=True)
        Path(t.status).unlink(missing_ok=True)
    try:
        if slurm is not None:
            return run_slurm(tasks, slurm, root / LOGS / "slurm")
        return run_local(tasks, workers)
    except ClassRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _student_work(root: Path, sid: str):
    return make_work(root / sid, create=False)  # the student's own run creates it


def _check_engine(workers: int, slurm: SlurmOptions | None) -> None:
    if slurm is None and workers < 1:
        raise ClassRunError(f"--workers is {workers}; give 1 or more students to run at once.")


# ---------------------------------------------------------------- the class run and the class check
def _class_to_run(csv_path, workers: int, slurm) -> list[dict] | None:
    """The class file's students once the pool or Slurm settings are known good; None after one error sentence."""
    try:
        _check_engine(workers, slurm)
        return read_class(csv_path)
    except (ClassFileError, ClassRunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def with_engine(command, args, *positional, **keywords) -> int:
    """command(..., workers=, slurm=) with the command line's pool or Slurm settings; a bad flag: one sentence."""
    try:
        slurm = slurm_options(args)
    except ClassRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return command(*positional, workers=args.workers, slurm=slurm, **keywords)


class _QuotedStrings(yaml.SafeDumper):
    """Every text quoted: a name such as 1e3 stays text (the run types the other cells by their notebook)."""


_QuotedStrings.add_representer(str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text,
                                                                                style='"'))


def run_class(csv_path, work_dir=None, only: list[str] | None = None, params: dict | None = None,
              workers: int = 1, slurm: SlurmOptions | None = None) -> int:
    """Run the course for every student; print and save the summary. Returns 0 when all passed, 130 when a
    Ctrl-C stopped the run, else 1."""
    students = _class_to_run(csv_path, workers, slurm)
    if students is None:
        return 2
    try:  # -p / -f values go into every student's parameter file: refused before any is written
        refuse_credentials(params or {})
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    notebooks = course_notebooks(only)
    declared = notebook_parameters()
    selected = {name for nb in notebooks for name in declared[nb.name[:2]]}
    root = class_root(work_dir)
    logs = root / LOGS / "run"
    tasks = []
    for student in students:
        sid = student["student_id"]
        params_file = logs / f"{sid}.yaml"  # also how to re-run one student by hand: run --work-dir DIR -f FILE
        settings = {**(params or {}), **student["params"]}
        if only:  # the run refuses parameters of notebooks it leaves out (the CSV's name, for --only 02)
            settings = {k: v for k, v in settings.items() if k in selected}
        atomic_write_text(params_file, yaml.dump(settings, Dumper=_QuotedStrings, allow_unicode=True, sort_keys=False))
        argv = [sys.executable, "-m", "helpers", "run", "--work-dir", str(_student_work(root, sid).root),
                "-f", str(params_file)] + (["--only", ",".join(nb.stem for nb in notebooks)] if only else [])
        tasks.append(Task(sid, student["name"], argv, str(logs / f"{sid}.log"), str(logs / f"{sid}.status.json"),
                          total=len(notebooks)))
    results = _execute(tasks, root, workers, slurm)
    if results is None:
        return 2
    rows = []
    for task, r in zip(tasks, results):
        work = _student_work(root, task.student_id)
        ran, reason = failure_reason(work, notebooks, r["attempt_started"] - 1) if r["attempts"] else (0, "")
        passed = r["code"] == 0 and not reason
        if not passed and (r.get("error") or not reason or reason.endswith("did not run")):
            reason = r.get("error") or r["last_line"] or reason or f"exit code {r['code']}"
        if r.get("interrupted"):  # the notebook it was in is half run: count only those it finished
            ran, reason = min(ran, _read_status(task).get("done", 0)), _interrupted_reason(r)
        rows.append({"student_id": task.student_id, "name": task.name, "status": _status(r, passed),
                     "notebooks": f"{ran}/{len(notebooks)}", "reason": "" if passed else reason,
                     "seconds": f"{r['seconds']:.1f}", "attempts": r["attempts"], "work_dir": str(work.root)})
    return _finish(root, "class_summary", "class summary", SUMMARY_COLUMNS, rows)


def check_class(csv_path, class_dir=None, workers: int = 1, slurm: SlurmOptions | None = None,
                flags: list[str] = ()) -> int:
    """`homework check` for every student of a class, in parallel; saves class_check.csv/.md. 0 when all pass."""
    students = _class_to_run(csv_path, workers, slurm)
    if students is None:
        return 2
    root = class_root(class_dir)
    logs = root / LOGS / "check"
    tasks = []
    for student in students:
        sid = student["student_id"]
        argv = [sys.executable, "-m", "helpers", "homework", "check", str(_student_work(root, sid).root),
                f"--name={student['name']}", "--json", str(logs / f"{sid}.json")]  # '=': a name may start with '-' 
        argv += list(flags)  # homework check's own flags, as the teacher gave them
        (logs / f"{sid}.json").unlink(missing_ok=True)
        tasks.append(Task(sid, student["name"], argv, str(logs / f"{sid}.log"), str(logs / f"{sid}.status.json"),
                          final_codes=(0, 1)))  # a failed check is a verdict; only a crash is retried
    results = _execute(tasks, root, workers, slurm)
    if results is None:
        return 2
    rows = []
    for task, r in zip(tasks, results):
        try:
            checks = json.loads((logs / f"{task.student_id}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            checks = None
        failed = [c for c in checks or [] if c["status"] == "FAIL"]
        passed = r["code"] == 0 and checks is not None and not failed
        reason = ("; ".join(f"{c['name']}: {c['reason']}" for c in failed) if checks is not None
                  else r.get("error") or r["last_line"] or f"exit code {r['code']}")
        if r.get("interrupted"):
            reason = _interrupted_reason(r)
        rows.append({"student_id": task.student_id, "name": task.name, "status": _status(r, passed),
                     "checks": f"{sum(c['status'] == 'PASS' for c in checks or [])}/{len(checks or [])}",
                     "reason": "" if passed else reason, "seconds": f"{r['seconds']:.1f}", "attempts": r["attempts"],
                     "work_dir": str(_student_work(root, task.student_id).root)})
    return _finish(root, "class_check", "class check", CHECK_COLUMNS, rows)


def _status(result: dict, passed: bool) -> str:
    return "interrupted" if result.get("interrupted") else "passed" if passed else "FAILED"


def _interrupted_reason(result: dict) -> str:
    return ("stopped" if result["attempts"] else "not started") + ": the class run was interrupted (Ctrl-C)"


def _finish(root: Path, stem: str, title: str, columns: list[str], rows: list[dict]) -> int:
    interrupted = sum(r["status"] == "interrupted" for r in rows)
    print(f"\n=== {title} ({sum(r['status'] == 'passed' for r in rows)} of {len(rows)} passed"
          + (f", {interrupted} interrupted)" if interrupted else ")"))
    print_table(columns, [[r[c] for c in columns] for r in rows])
    save_summary(root, rows, columns, stem)
    print(f"\nsummary: {root / (stem + '.csv')}\n         {root / (stem + '.md')}\nlogs:    {root / LOGS}")
    if interrupted:
        return 130  # what a shell reports for a command ended by Ctrl-C
    return 0 if all(r["status"] == "passed" for r in rows) else 1


def save_summary(root: Path, rows: list[dict], columns: list[str] = SUMMARY_COLUMNS, stem: str = "class_summary") -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(root / f"{stem}.csv", buf.getvalue())
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    atomic_write_text(root / f"{stem}.md", "\n".join(md) + "\n")


# ---------------------------------------------------------------- command-line flags shared by `run` and `homework check`
def add_class_arguments(p) -> None:
    g = p.add_argument_group("class runs (with --class)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="students at once on this machine: one GPU each (round robin), or a share of the CPU")
    g.add_argument("--slurm", action="store_true", help="run the students as a Slurm job array (submitit) instead")
    g.add_argument("--slurm-partition", default=None, metavar="NAME", help="Slurm partition (default: the cluster's default)")
    g.add_argument("--max-parallel", type=int, default=8, metavar="N", help="with --slurm: students running at once")
    g.add_argument("--slurm-gpus", type=int, default=1, metavar="N", help="with --slurm: GPUs per student")
    g.add_argument("--slurm-cpus", type=int, default=8, metavar="N", help="with --slurm: CPU cores per student")
    g.add_argument("--slurm-time", type=int, default=240, metavar="MIN", help="with --slurm: minutes per student before Slurm stops it")
    g.add_argument("--slurm-mem", type=int, default=None, metavar="GB", help="with --slurm: memory per student in GB")
    g.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="with --slurm: any other sbatch option, e.g. account=course (repeatable)")


def slurm_options(args) -> SlurmOptions | None:
    """The Slurm settings of the command line, or None for the local pool."""
    if not args.slurm:
        return None
    extra = {}
    for item in args.slurm_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ClassRunError(f"--slurm-option {item!r} is not KEY=VALUE; write it like account=course.")
        extra[key.strip().lstrip("-").replace("-", "_")] = value
    if args.max_parallel < 1:
        raise ClassRunError(f"--max-parallel is {args.max_parallel}; give 1 or more students to run at once.")
    return SlurmOptions(args.slurm_partition, args.max_parallel, args.slurm_gpus, args.slurm_cpus, args.slurm_time,
                        args.slurm_mem, extra)
