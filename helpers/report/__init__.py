"""The homework report: WORK/report/index.html, the page to hand in (one self-contained HTML file, images embedded;
Chinese is set in Noto Sans CJK and emoji in Noto Color Emoji, named in its CSS with the usual fallbacks), and its
Markdown twin index.md, built from the results JSON and artifacts. One page in the course's order: who the assistant
is, training, the chats, the over-fitting check, the merge, the pictures, where it was published and what the student
learned; the bookkeeping (versions, hashes, settings) is an appendix, collapsed.

    python -m helpers report WORK

Read it in this order:
- records.py   reading the work directory: the notebooks' names, evaluation rounds, the loss log, metrics_table
- document.py  Section (blocks both writers render), opened from a notebook's results: not run, unreadable, stale
- sections.py  the sections in the course's order, from who the assistant is to what the student learned
- appendix.py  the bookkeeping, collapsed
- writers.py   render_html (self-contained, CJK and emoji fonts) and render_markdown
- build.py     build_report: every section, written beside the old report and swapped in whole
- cli.py       `python -m helpers report WORK`
"""
from __future__ import annotations

from .appendix import HYPER_KEYS, PREVIEW_RECORDS, appendix_section
from .build import build_report, sections
from .cli import add_command
from .document import Section
from .records import NOTEBOOKS, evaluation_rounds, loss_points, metrics_table, vlm_image
from .sections import (HELD_IN, LEARNED_HINT, VLM_TABLE_KEYS, assistant_section, before_after_section,
                       evaluation_section, fine_tune_cost_section, learned_section, merge_section, overfitting_section,
                       publish_section, training_section, vlm_pairs, vlm_section)
from .writers import CSS, EMOJI_FONTS, FONT_STACK, render_html, render_markdown

__all__ = ["HYPER_KEYS", "PREVIEW_RECORDS", "appendix_section", "build_report", "sections", "add_command", "Section",
           "NOTEBOOKS", "evaluation_rounds", "loss_points", "metrics_table", "vlm_image", "HELD_IN", "LEARNED_HINT",
           "VLM_TABLE_KEYS", "assistant_section", "before_after_section", "evaluation_section",
           "fine_tune_cost_section", "learned_section", "merge_section", "overfitting_section", "publish_section",
           "training_section", "vlm_pairs", "vlm_section", "CSS", "EMOJI_FONTS", "FONT_STACK", "render_html",
           "render_markdown"]
