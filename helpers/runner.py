"""Run the course headless: every notebook in order, with papermill, into WORK/executed/."""
from __future__ import annotations

import os
import sys
import time

from .classroom import add_class_arguments, run_class, with_engine
from .notebooks import course_notebooks
from .paths import NOTEBOOKS_DIR, work as make_work
from .progress import print_table


def _typed(value: str, declared_type: str | None):
    """A -p value as YAML with numbers as people write them (2e-4, .5), except where the notebook declares a string."""
    from .parameters import parse_value

    return value if declared_type == "str" else parse_value(value)


def _declared_type(declared: dict) -> str:
    """papermill's type of a parameter, "str" for a default written as text: name = "小明" declares a name, so a
    student called 007 or 1e3 stays text (papermill infers types only from annotations)."""
    default = str(declared.get("default") or "").lstrip()
    return "str" if default[:1] in ("'", '"') else declared["inferred_type_name"]


def _readable_parameters() -> None:
    """Injected strings as Python literals with their Unicode intact (papermill escapes it: "\\u5c0f...")."""
    from papermill.translators import PythonTranslator, papermill_translators

    class ReadablePython(PythonTranslator):
        @classmethod
        def translate_str(cls, val):
            return repr(val)

    papermill_translators.register("python", ReadablePython)


def run_course(work_dir=None, only=None, params: dict | None = None, quiet: bool = False) -> int:
    """Execute the notebooks; stop at the first failure, naming notebook, cell and error. Returns 0 or 1."""
    import papermill as pm

    from .publish import PublishError, refuse_credentials

    try:  # papermill writes every parameter into the executed notebook: a token in a URL must stop here
        refuse_credentials(params or {})
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _readable_parameters()
    work = make_work(work_dir)
    work.executed.mkdir(parents=True, exist_ok=True)
    os.environ["KIT_HEADLESS"] = "1"  # the kernels inherit it: plain-text progress, no widget noise
    params = dict(params or {})
    summary = []
    status = 0
    for nb in course_notebooks(only):
        declared = pm.inspect_notebook(str(nb))
        passed = {k: _typed(v, _declared_type(declared[k])) if isinstance(v, str) else v
                  for k, v in params.items() if k in declared}
        if "work_dir" in declared:
            passed["work_dir"] = str(work.root)
        out = work.executed / nb.name
        start = time.time()
        if not quiet:
            print(f"running {nb.name} ...", flush=True)
        try:
            pm.execute_notebook(str(nb), str(out), parameters=passed, cwd=str(NOTEBOOKS_DIR),
                                kernel_name="python3", progress_bar=False, log_output=False)
        except pm.PapermillExecutionError as e:
            summary.append((nb.name, "FAILED", time.time() - start))
            print(f"\n{nb.name} failed in cell {e.exec_count} ({e.ename}: {e.evalue.splitlines()[0] if e.evalue else ''})."
                  f"\nThe executed notebook is kept for inspection: {out}", file=sys.stderr)
            status = 1
            break
        summary.append((nb.name, "ok", time.time() - start))
    print_table(["notebook", "status", "seconds"], [(n, s, f"{t:.1f}") for n, s, t in summary])
    print(f"\nexecuted notebooks: {work.executed}\nresults:            {work.results}")
    if status == 0:
        _build_report(work)
    return status


def _build_report(work) -> None:
    """The homework report from whatever results exist (cheap: it only reads files)."""
    from .report import build_report

    try:
        print(f"report:             {build_report(work.root)}")
    except Exception as e:  # the notebooks' own results stand even if the report cannot be built
        print(f"warning: the report could not be built ({type(e).__name__}: {e}); "
              f"retry with `python -m helpers report {work.root}`.", file=sys.stderr)


def add_command(sub) -> None:
    p = sub.add_parser("run", help="run the course notebooks headless with papermill")
    p.add_argument("--work-dir", default=None, help="work directory (default: ./work)")
    p.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 00,01")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a parameter for every notebook that declares it (repeatable)")
    p.add_argument("-f", "--params-file", default=None, help="YAML file of parameters")
    p.add_argument("--class", dest="class_file", default=None, metavar="STUDENTS_CSV",
                   help="run once per student (CSV: student_id,name,+parameters), each into WORK_DIR/<student_id>")
    add_class_arguments(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .notebooks import notebook_parameters
    from .parameters import ParameterError, check_names, read_params_file

    params, given = {}, {}
    only = args.only.split(",") if args.only else None
    try:
        if args.params_file:
            params.update(read_params_file(args.params_file))
            given.update(dict.fromkeys(params, str(args.params_file)))
        params.update(dict(args.param))
        given.update(dict.fromkeys(dict(args.param), "-p"))
        # before any notebook runs: a misspelt name would otherwise be dropped without a word
        check_names(given, notebook_parameters(), [nb.name[:2] for nb in course_notebooks(only)])
    except ParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.class_file:
        return with_engine(run_class, args, args.class_file, args.work_dir, only, params)
    return run_course(args.work_dir, only, params)
