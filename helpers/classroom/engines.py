"""Where the students run: a pool on this machine (one GPU each, round robin, or a share of the CPU) or a Slurm
job array through submitit."""
from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .live import CtrlC, LiveTable, _watch
from .roster import LOGS
from .tasks import Stop, Task, run_task


class ClassRunError(ValueError):
    """A class run that cannot start (bad --workers, no Slurm here); the message says what to change."""


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
        from ..train import GPU_SHARE_ENV

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


def _check_engine(workers: int, slurm: SlurmOptions | None) -> None:
    if slurm is None and workers < 1:
        raise ClassRunError(f"--workers is {workers}; give 1 or more students to run at once.")
