"""One student's task, in the pool or on a Slurm node: the command run (and retried once), the status file the
live table reads, and the stop switch that ends a student's whole process tree."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import psutil  # ipykernel's own dependency, loaded with the kit: a kill must not wait for an import
except ImportError:
    psutil = None

from ..data import atomic_write_text

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


def _killed_with(parent: int):
    """For a child process (Linux): SIGKILL once `parent` dies, as a Slurm job's cgroup takes its processes along.
    A job that is cancelled kills its student before it ends, but may itself be killed first (SIGKILL)."""
    def set_up() -> None:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above: nobody is left to stop this student
            os._exit(1)
    return set_up


class Stop:
    """A class run's stop switch, thrown by the teacher's first Ctrl-C: no student starts after it, the running
    ones are stopped (their whole process tree), and nothing is retried."""

    def __init__(self, die_with_parent: bool = False):
        self.die_with_parent = die_with_parent  # students are killed when this process dies (a Slurm job's)
        self.requested = threading.Event()
        self._lock = threading.RLock()  # re-entered when a second Ctrl-C lands while the first is stopping students
        self._running: set = set()

    def popen(self, argv: list[str], **kw) -> subprocess.Popen | None:
        """The student's process in a session of its own, so only the class run hears the terminal's Ctrl-C;
        None once the run is stopping."""
        with self._lock:
            if self.requested.is_set():
                return None
            if self.die_with_parent and sys.platform.startswith("linux"):
                kw["preexec_fn"] = _killed_with(os.getpid())
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
    stop = stop or Stop(die_with_parent=True)  # on a Slurm node: the job's own, never thrown (a cancel ends the job)
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
