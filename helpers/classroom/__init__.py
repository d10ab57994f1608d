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

Read it in this order:
- roster.py   the class file: read_class, its checks on ids, names and parameter columns
- tasks.py    one student's task: run_task (retried once), its status file, Stop and signal_tree
- live.py     the live table, the teacher's Ctrl-C, and the wait for every student (STOP_GRACE_S is set here)
- engines.py  run_local (a worker pool) and run_slurm (a submitit job array)
- classes.py  run_class and check_class: the tasks of a class, then its summary
- cli.py      the flags of `run --class` and `homework check --class`
"""
from __future__ import annotations

from .classes import (CHECK_COLUMNS, SUMMARY_COLUMNS, check_class, class_root, failure_reason, run_class,
                      save_summary)
from .cli import add_class_arguments, slurm_options, with_engine
from .engines import ClassRunError, SlurmOptions, run_local, run_slurm, visible_gpus
from .live import INTERRUPTED, CtrlC, LiveTable
from .roster import LOGS, MAX_NAME, REQUIRED, SAFE_ID, ClassFileError, declared_parameters, read_class
from .tasks import RUNNING, Stop, Task, run_task, signal_tree

__all__ = ["CHECK_COLUMNS", "SUMMARY_COLUMNS", "check_class", "class_root", "failure_reason", "run_class",
           "save_summary", "add_class_arguments", "slurm_options", "with_engine", "ClassRunError", "SlurmOptions",
           "run_local", "run_slurm", "visible_gpus", "INTERRUPTED", "CtrlC", "LiveTable", "LOGS", "MAX_NAME",
           "REQUIRED", "SAFE_ID", "ClassFileError", "declared_parameters", "read_class", "RUNNING", "Stop", "Task",
           "run_task", "signal_tree"]
