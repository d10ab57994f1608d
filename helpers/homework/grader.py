"""check_work: every check on one work directory, in order, each judged on the artifacts."""
from __future__ import annotations

from ..paths import work as make_work
from .answers import check_identity, check_merge, check_overfitting, check_vlm
from .provenance import check_base, check_dataset
from .remote import check_publish
from .verdict import Check, Graded

CHECK_NAMES = ("base", "dataset", "identity", "overfitting", "merge", "vlm", "publish")  # in order


def check_work(work_dir, name: str | None = None, publish: bool = False, questions_file: str | None = None,
               require_base: str | None = None, require_preset: str | None = None,
               allow_practice_remote: bool = False, skip: set[str] = frozenset()) -> list[Check]:
    """Every homework check on one work directory, each judged on the artifacts (models, adapter, data, remote);
    the results JSON files are never evidence."""
    work = make_work(work_dir, create=False)
    if not work.root.is_dir():
        return [Check("work dir", "FAIL", f"{work.root} does not exist; give the student's work directory")]
    graded = Graded()
    steps = [("base", lambda: check_base(work, graded, require_base, require_preset)),
             ("dataset", lambda: check_dataset(work, graded, name)),
             ("identity", lambda: check_identity(work, graded, questions_file)),
             ("overfitting", lambda: check_overfitting(work, graded)),
             ("merge", lambda: check_merge(work, graded, questions_file)),
             ("vlm", lambda: check_vlm(work)),
             ("publish", lambda: check_publish(work, publish, allow_practice_remote))]
    # the base and the dataset run even when skipped: the other checks need the base to load and the name
    return [Check(label, "SKIP", "skipped (--skip)") if label in skip and (label not in ("base", "dataset") or step())
            else step() for label, step in steps]


def print_checks(checks: list[Check]) -> None:
    from ..progress import print_table

    print_table(["check", "result", "reason"], [(c.name, c.status, c.reason) for c in checks])
