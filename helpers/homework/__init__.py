"""Homework: student versions of the notebooks (solution regions blanked) and an automatic check of a
student's work directory.

    python -m helpers homework make-student OUT_DIR
    python -m helpers homework check WORK [--name NAME] [--publish]

Read it in this order:
- student.py     make_student: the notebooks with each solution region turned into a TODO
- verdict.py     Check (one verdict), Graded (what the grader found once), the shared sentences
- provenance.py  the base and dataset checks: what the work was made from
- answers.py     the identity, over-fitting, merge and VLM checks: models loaded and asked
- remote.py      the publish check: the remote read back
- grader.py      check_work: every check in order
- cli.py         `homework make-student` and `homework check` (one student, or a class)
"""
from __future__ import annotations

from .answers import (ADAPTER_MATTERS, GENERAL_QUESTIONS, IDENTITY_SHARE, OVERFIT_SHARE, PARAPHRASES, VLM_MATCH_SHARE,
                      check_identity, check_merge, check_overfitting, check_vlm, grader_questions)
from .cli import add_command
from .grader import CHECK_NAMES, check_work, print_checks
from .provenance import check_base, check_dataset
from .remote import check_publish
from .student import BEGIN, END, MarkerError, blank_solutions, make_student, student_notebook
from .verdict import Check, Graded, trained_on

__all__ = ["ADAPTER_MATTERS", "GENERAL_QUESTIONS", "IDENTITY_SHARE", "OVERFIT_SHARE", "PARAPHRASES",
           "VLM_MATCH_SHARE", "check_identity", "check_merge", "check_overfitting", "check_vlm", "grader_questions",
           "add_command", "CHECK_NAMES", "check_work", "print_checks", "check_base", "check_dataset", "check_publish",
           "BEGIN", "END", "MarkerError", "blank_solutions", "make_student", "student_notebook", "Check", "Graded",
           "trained_on"]
