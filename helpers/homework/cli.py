"""`python -m helpers homework make-student | check`: the command line of the student versions and the grader."""
from __future__ import annotations

import sys
from pathlib import Path

from ..classroom import add_class_arguments, check_class, with_engine
from .grader import CHECK_NAMES, check_work, print_checks
from .student import MarkerError, make_student


def add_command(sub) -> None:
    p = sub.add_parser("homework", help="student versions of the notebooks; check a student's work dir")
    hw = p.add_subparsers(dest="homework_command", required=True)
    m = hw.add_parser("make-student", help="write the notebooks with the solution regions blanked")
    m.add_argument("out_dir", help="where the student versions go")
    m.set_defaults(func=_make_student)
    c = hw.add_parser("check", help="check a work directory; exit code 1 on any failed check")
    c.add_argument("work_dir", nargs="?", default=None,
                   help="the student's work directory (with --class: the class directory, default ./work/class)")
    c.add_argument("--name", default=None,
                   help="the name the assistant must give (default: the one in the data the adapter was trained on)")
    c.add_argument("--publish", action="store_true",
                   help="require the model repo on a model hub (read back from the remote)")
    c.add_argument("--allow-practice-remote", action="store_true",
                   help="with --publish: a local or file:// remote counts (it is still reported as practice)")
    c.add_argument("--questions", default=None, metavar="FILE",
                   help="your own identity questions, one a line (hidden from students), instead of the built-in ones")
    c.add_argument("--require-base", default=None, metavar="DIR_OR_HUB_ID",
                   help="the base model the work must be made on; every model check judges on it")
    c.add_argument("--require-preset", default=None, metavar="PRESET",
                   help="the training preset whose LoRA settings the adapter must have (e.g. homework)")
    c.add_argument("--skip", default="", metavar="CHECKS",
                   help="checks not to run, comma-separated (e.g. vlm when the class skipped notebook 05)")
    c.add_argument("--json", default=None, metavar="FILE", help="also write the checks to FILE as JSON")
    c.add_argument("--class", dest="class_file", default=None, metavar="STUDENTS_CSV",
                   help="check every student of a class (CSV: student_id,name,...) in WORK_DIR/<student_id>")
    add_class_arguments(c)
    c.set_defaults(func=_check)


def _make_student(args) -> int:
    try:
        written = make_student(args.out_dir)
    except MarkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, regions in written:
        print(f"wrote {path}  ({regions} solution region{'s' if regions != 1 else ''} blanked)")
    return 0


def _check(args) -> int:
    import json
    import os as _os

    from ..data import atomic_write_text
    from ..progress import quiet_libraries

    if args.class_file:
        flags = ["--publish"] * args.publish + ["--allow-practice-remote"] * args.allow_practice_remote
        for flag, value in (("--questions", args.questions), ("--require-base", args.require_base),
                            ("--require-preset", args.require_preset), ("--skip", args.skip)):
            flags += [f"{flag}={Path(value).resolve() if flag == '--questions' else value}"] if value else []
        return with_engine(check_class, args, args.class_file, args.work_dir, flags=flags)
    if args.work_dir is None:
        print("error: give the student's work directory (or --class STUDENTS_CSV for a class).", file=sys.stderr)
        return 2

    _os.environ.setdefault("KIT_HEADLESS", "1")
    quiet_libraries()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(CHECK_NAMES):
        print(f"error: --skip names {sorted(skip - set(CHECK_NAMES))}; the checks are {', '.join(CHECK_NAMES)}.",
              file=sys.stderr)
        return 2
    checks = check_work(args.work_dir, args.name, args.publish, questions_file=args.questions,
                        require_base=args.require_base, require_preset=args.require_preset,
                        allow_practice_remote=args.allow_practice_remote, skip=skip)
    print_checks(checks)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps([vars(c) for c in checks], ensure_ascii=False, indent=1) + "\n")
    failed = [c.name for c in checks if c.status == "FAIL"]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0
