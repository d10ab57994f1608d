"""build_report: the sections in the course's order, written beside the old report and swapped in whole."""
from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from ..paths import Work, staged_dir, work as make_work
from ..results import read_results
from .appendix import appendix_section
from .document import Section
from .records import NOTEBOOKS
from .sections import (assistant_section, before_after_section, evaluation_section, fine_tune_cost_section,
                       learned_section, merge_section, overfitting_section, publish_section, training_section,
                       vlm_section)
from .writers import render_html, render_markdown


def sections(work: Work) -> list[Section]:
    """The report in the course's order; the bookkeeping last, collapsed."""
    return [assistant_section(work), evaluation_section(work), training_section(work), before_after_section(work),
            overfitting_section(work), fine_tune_cost_section(work), merge_section(work), vlm_section(work),
            publish_section(work), learned_section(work), appendix_section(work)]


def build_report(work_dir=None) -> Path:
    """Write WORK/report/index.html and index.md (plus the images index.md links); returns index.html.
    The report is built beside and swapped in by rename, so a failed build leaves the old one whole."""
    work = make_work(work_dir)
    secs = sections(work)
    name = (read_results(work, NOTEBOOKS["01"]) or {}).get("name")
    title = f"Homework report: {name}'s assistant" if name else "Homework report"
    ran = sum(s.ran for s in secs)
    meta = f"Work directory {work.root} · built {datetime.now():%Y-%m-%d %H:%M} · {ran} of {len(secs)} sections ran"
    with staged_dir(work.report) as tmp:
        images = {}
        for s in secs:
            for b in s.blocks:
                if b[0] == "img" and b[1] not in images:
                    n = sum(f.startswith(s.key) for f in images.values())
                    images[b[1]] = f"{s.key}{f'-{n + 1}' if n else ''}{b[1].suffix.lower()}"
                    shutil.copyfile(b[1], tmp / images[b[1]])
        (tmp / "index.html").write_text(render_html(title, meta, secs), encoding="utf-8")
        (tmp / "index.md").write_text(render_markdown(title, meta, secs, images), encoding="utf-8")
    return work.report / "index.html"
