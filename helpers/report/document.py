"""The document model: a Section of blocks that both writers render, opened from a notebook's results (or not run)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..paths import Work
from ..results import read_results
from .records import _text


@dataclass
class Section:
    """One section, kept as blocks both writers render: ("p", text), ("table", header, rows), ("img", path, alt),
    ("pre", text)."""

    key: str
    title: str
    ran: bool = True
    blocks: list = field(default_factory=list)
    stale: str = ""  # the note when the results came from files that have changed since (an older run)
    collapsed: bool = False  # shown folded (<details>): bookkeeping a reader opens when they want it

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list]):
        if rows:
            self.blocks.append(("table", header, [[_text(x) for x in r] for r in rows]))

    def img(self, path: Path, alt: str):
        self.blocks.append(("img", path, alt))

    def pre(self, text: str):
        self.blocks.append(("pre", text))


def _not_run(key: str, title: str, notebook: str, why: str = "") -> Section:
    s = Section(key, title, ran=False)
    s.p(why or f"not run: notebook {notebook} has not written results/{notebook}.json in this work directory.")
    return s


def _unreadable(key, title, r) -> Section | None:
    if r is not None and "_unreadable" in r:
        s = Section(key, title, ran=False)
        s.p(f"not run: {r['_unreadable']}.")
        return s
    return None


def _open(work: Work, key: str, title: str, notebook: str) -> tuple[Section, dict | None]:
    """The section and the notebook's results; results None when the section only says 'not run'."""
    r = read_results(work, notebook)
    if r is None:
        return _not_run(key, title, notebook), None
    unreadable = _unreadable(key, title, r)
    return (unreadable, None) if unreadable else (_marked_if_stale(work, Section(key, title), r, notebook), r)


def _marked_if_stale(work: Work, s: Section, r: dict, notebook: str) -> Section:
    """Marks a section "from an older run" when its results' "sources" hashes no longer match the files."""
    from ..fingerprint import stale_sources

    changed = stale_sources(work, r.get("sources")) if isinstance(r.get("sources"), dict) else []
    if changed:
        folders = ", ".join(f"WORK/{getattr(work, n).relative_to(work.root)}" for n in changed)
        s.stale = (f"From an older run: {folders} {'has' if len(changed) == 1 else 'have'} changed since these "
                   f"results were made from {'it' if len(changed) == 1 else 'them'}; re-run notebook {notebook} "
                   "to bring them up to date.")
    return s
