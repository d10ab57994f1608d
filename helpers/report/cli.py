"""The command line: python -m helpers report WORK."""
from __future__ import annotations

import sys

from ..paths import work as make_work
from .build import build_report


def add_command(sub) -> None:
    p = sub.add_parser("report", help="build WORK/report/index.html (self-contained) and index.md")
    p.add_argument("work_dir", nargs="?", default=None, help="the work directory (default: ./work)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    work = make_work(args.work_dir, create=False)
    if not work.root.is_dir():
        print(f"error: {work.root} does not exist; give the work directory a course run wrote.", file=sys.stderr)
        return 2
    index = build_report(work.root)
    print(f"wrote {index}\n      {index.with_name('index.md')}")
    return 0
