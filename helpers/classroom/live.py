"""What the teacher sees and presses while a class runs: the live table, Ctrl-C (once: stop the students; twice:
quit at once), and the wait that turns every student's end into a result."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import Future

from .tasks import Task, _read_status

STOP_GRACE_S = 30  # after the first Ctrl-C, students still running this long are killed


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
