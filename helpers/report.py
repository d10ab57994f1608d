"""The homework report: WORK/report/index.html (one self-contained file, images embedded, Chinese
rendered with a CJK font) and its Markdown twin index.md, built from the results JSON and artifacts.

    python -m helpers report WORK
"""
from __future__ import annotations

import base64
import html
import json
import mimetypes
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .paths import Work, staged_dir, work as make_work
from .results import read_results, table_rows

NOTEBOOKS = {
    "00": "00_environment", "01": "01_data_generation", "02": "02_qlora_finetune", "03": "03_merge",
    "04": "04_chat_demo", "05": "05_vlm_llava_finetune", "06": "06_publish",
}
PREVIEW_RECORDS = 6
# Noto CJK first (fonts-noto-cjk on Debian), then the usual CJK system fonts of macOS and Windows.
FONT_STACK = ('"Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Micro Hei", '
              '"PingFang SC", "Microsoft YaHei", sans-serif')
CSS = """
body { font-family: %s; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #345; padding-bottom: .3em; }
h2 { margin-top: 2em; color: #234; border-bottom: 1px solid #ccd; }
table { border-collapse: collapse; margin: .8em 0; font-size: 14px; }
th, td { border: 1px solid #ccd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f6; }
img { max-width: 100%%; border: 1px solid #ddd; }
.not-run { color: #a33; font-style: italic; }
.pass { color: #161; font-weight: bold; } .fail { color: #a11; font-weight: bold; }
.meta { color: #667; font-size: 13px; }
.stale { color: #8a5a00; background: #fff6dd; padding: 4px 8px; font-weight: bold; }
""" % FONT_STACK


# ---------------------------------------------------------------- reading the work dir
def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def _scalars(d: dict, skip=()) -> list[tuple[str, str]]:
    return [(k, _text(v)) for k, v in d.items()
            if k not in skip and not k.startswith("_") and (isinstance(v, (str, int, float, bool)) or v is None)]


def _find_push(r: dict) -> dict:
    """The push record of notebook 06, top level or nested (it names a commit)."""
    if "commit" in r or "pushed_commit" in r:
        return r
    return next((v for v in r.values() if isinstance(v, dict) and ("commit" in v or "pushed_commit" in v)), {})


def evaluation_rounds(work: Work) -> list[dict]:
    rounds = []
    for p in sorted(work.eval_outputs.glob("step_*.json")) if work.eval_outputs.exists() else []:
        try:
            r = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and isinstance(r.get("answers"), list):
            rounds.append(r)
    return sorted(rounds, key=lambda r: r.get("step", 0))


def loss_points(work: Work) -> list[tuple[int, float]]:
    points = []
    if work.metrics.exists():
        for line in work.metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)):
                points.append((row.get("step", len(points)), float(row["loss"])))
    return points


def vlm_image(work: Work, r: dict) -> Path | None:
    for key in ("image", "image_path", "picture"):
        v = r.get(key)
        if isinstance(v, str) and Path(v).is_file():
            return Path(v)
    if isinstance(r.get("images"), list) and r["images"] and Path(str(r["images"][0])).is_file():
        return Path(str(r["images"][0]))
    found = sorted(p for ext in ("png", "jpg", "jpeg") for p in work.vlm_data.glob(f"*.{ext}")) if work.vlm_data.exists() else []
    return found[0] if found else None


# ---------------------------------------------------------------- the document model
@dataclass
class Section:
    """One section, kept as blocks both writers render: ("p", text), ("table", header, rows), ("img", path, alt)."""

    key: str
    title: str
    ran: bool = True
    blocks: list = field(default_factory=list)
    stale: str = ""  # the note when the results came from files that have changed since (an older run)

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list]):
        if rows:
            self.blocks.append(("table", header, [[_text(x) for x in r] for r in rows]))

    def img(self, path: Path, alt: str):
        self.blocks.append(("img", path, alt))


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
    from .fingerprint import stale_sources

    changed = stale_sources(work, r.get("sources")) if isinstance(r.get("sources"), dict) else []
    if changed:
        folders = ", ".join(f"WORK/{getattr(work, n).relative_to(work.root)}" for n in changed)
        s.stale = (f"From an older run: {folders} {'has' if len(changed) == 1 else 'have'} changed since these "
                   f"results were made from {'it' if len(changed) == 1 else 'them'}; re-run notebook {notebook} "
                   "to bring them up to date.")
    return s


def environment_section(work: Work) -> Section:
    s, r = _open(work, "environment", "Environment", NOTEBOOKS["00"])
    if r is None:
        return s
    s.table(["fact", "value"], _scalars(r, skip=("recommendation", "qlora_4bit_note")))
    if r.get("recommendation"):
        s.p(str(r["recommendation"]))
    identity = r.get("base_model_identity")
    if isinstance(identity, dict):  # which base model, by content (what `homework check --require-base` compares)
        preset = ((read_results(work, "02_qlora_finetune") or {}).get("hyper_parameters") or {}).get("preset")
        rows = [(k, _text(identity[k])) for k in ("source", "architecture", "parameters", "hidden_size", "layers",
                                                  "vocab_size", "content_sha256") if k in identity]
        s.table(["base model", "value"], rows + ([("preset (notebook 02)", preset)] if preset else []))
    return s


def data_section(work: Work) -> Section:
    from .data import DataError, load_dataset

    s, r = _open(work, "data", "Data", NOTEBOOKS["01"])
    if r is None:
        return s
    s.p(f"The assistant belongs to {r.get('name', '?')}; it should answer: {r.get('answer', '?')}")
    s.table(["fact", "value"], [(k, _text(r[k])) for k in ("records", "identity_records", "general_records", "format",
                                                          "output_format", "questions", "evaluation_inputs", "system")
                                if k in r])
    tl = r.get("token_length")
    if isinstance(tl, dict):
        s.table(["token length", "value"], [(k, _text(v)) for k, v in tl.items()])
    try:
        conversations = load_dataset(work.dataset)
    except DataError as e:
        s.p(f"The data file cannot be previewed: {e}")
        return s
    rows = [[" / ".join(m["content"] for m in c if m["role"] == role) for role in ("system", "user", "assistant")]
            for c in conversations[:PREVIEW_RECORDS]]
    s.p(f"The first {len(rows)} of {len(conversations)} records of {work.dataset.name}:")
    s.table(["system", "user", "assistant"], rows)
    return s


HYPER_KEYS = ("hyperparameters", "hyper_parameters", "training_config", "config", "settings")


def training_section(work: Work) -> Section:
    s, r = _open(work, "training", "Training (QLoRA fine-tune)", NOTEBOOKS["02"])
    if r is None:
        return s
    hyper = next((r[k] for k in HYPER_KEYS if isinstance(r.get(k), dict)), None)
    s.table(["result", "value"], _scalars(r))
    if hyper:
        s.table(["hyper-parameter", "value"], _scalars(hyper))
    if work.loss_plot.exists():
        s.img(work.loss_plot, "training loss curve")
    else:
        points = loss_points(work)
        s.p(f"No loss plot was saved; the loss went from {points[0][1]:.4g} to {points[-1][1]:.4g} over "
            f"{len(points)} logged steps." if points else "No loss curve was saved (WORK/train/loss.png is missing).")
    return s


def evaluation_section(work: Work) -> Section:
    key, title = "evaluation", "Evaluation outputs per step"
    rounds = evaluation_rounds(work)
    if not rounds:
        return _not_run(key, title, NOTEBOOKS["02"], "not run: WORK/train/eval_outputs/ holds no evaluation rounds "
                                                     "(notebook 02_qlora_finetune writes them).")
    s = Section(key, title)
    s.p("The answers to the evaluation inputs before training, at every evaluation step and at the end: "
        "the identity arrives from left to right.")
    questions = rounds[0].get("inputs") or [f"question {i + 1}" for i in range(len(rounds[0]["answers"]))]
    header = ["question"] + [f"step {r.get('step', '?')}" for r in rounds]
    s.table(header, [[q] + [r["answers"][i] if i < len(r["answers"]) else "" for r in rounds]
                     for i, q in enumerate(questions)])
    return s


def merge_section(work: Work) -> Section:
    s, r = _open(work, "merge", "Merge check", NOTEBOOKS["03"])
    if r is None:
        return s
    passed = r.get("passed")
    s.p(("PASSED" if passed else "FAILED") + f": the merged final_model and base + adapter give logits that differ by "
        f"at most {_text(r.get('max_abs_diff'))} (tolerance {_text(r.get('tolerance'))}).")
    s.table(["fact", "value"], [(k, _text(r[k])) for k in ("max_abs_diff", "tolerance", "passed", "dtype",
                                                          "adapter_effect_max_abs", "size_bytes", "base_size_bytes",
                                                          "adapter_size_bytes", "final_model") if k in r])
    if isinstance(r.get("reload_answers"), list):
        s.table(["answer of the reloaded final_model"], [[a] for a in r["reload_answers"]])
    return s


def before_after_section(work: Work) -> Section:
    s, r = _open(work, "before-after", "Before / after (LLM)", NOTEBOOKS["04"])
    if r is None:
        return s
    rows = table_rows(r, ("rows", "before_after", "table", "comparison"))
    if not rows:
        s.p("Notebook 04 saved no before/after table.")
        return s
    columns = [c for c in ("kind", "question", "before", "after", "reference") if any(c in row for row in rows)]
    columns += [c for c in dict.fromkeys(k for row in rows for k in row) if c not in columns]
    s.table(columns, [[row.get(c, "") for c in columns] for row in rows])
    verdict = {k: v for k, v in r.items() if k.startswith(("identity_on", "general", "overfitted", "evaluation_q"))}
    if verdict:
        s.table(["over-fitting check", "value"], _scalars(verdict))
    if isinstance(r.get("contrast"), dict):  # the adapter over-fitted on purpose, for comparison
        s.table(["over-fitted contrast", "value"], _scalars(r["contrast"]))
    return s


def fine_tune_cost_section(work: Work) -> Section:
    """The table helpers.evaluate saved (notebook 04 or `python -m helpers evaluate`): base, base + adapter,
    final_model and the delta."""
    title = "What the fine-tune cost"
    r = read_results(work, "evaluation")
    if r is None:
        return _not_run("cost", title, NOTEBOOKS["04"], "not run: neither notebook 04 nor `python -m helpers "
                                                         "evaluate` has written results/evaluation.json here.")
    s = _unreadable("cost", title, r) or _marked_if_stale(work, Section("cost", title), r, NOTEBOOKS["04"])
    rows = table_rows(r, ("table",)) if s.ran else []
    if s.ran and not rows:
        s.p("results/evaluation.json holds no evaluation table; run notebook 04 again.")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    s.table(columns, [[row.get(c, "") for c in columns] for row in rows])
    return s


# Notebook 05's before/after answers, as the report shows them (a record for reading: the grader asks the model).
VLM_TABLE_KEYS = ("before_after", "table", "rows", "comparison")


def _is_before(column: str) -> bool:
    c = column.lower().replace("_", " ")
    return c.startswith(("before", "stage 1", "stage1"))


def _is_after(column: str) -> bool:
    c = column.lower().replace("_", " ")
    return c.startswith(("after", "stage 2", "stage2")) and not c.endswith(("match", "matches"))


def vlm_pairs(r: dict) -> list[tuple[str, str, str]]:
    """(question, before, after) rows of notebook 05's results, from its table or from parallel lists."""
    for key in VLM_TABLE_KEYS:
        rows = table_rows(r, (key,))
        if rows:
            before = next((c for c in rows[0] if _is_before(c)), None)
            after = next((c for c in rows[0] if _is_after(c)), None)
            if before and after:
                return [(str(row.get("question", row.get("prompt", ""))), row.get(before), row.get(after)) for row in rows]
    lists = {k: v for k, v in r.items() if isinstance(v, list) and v and all(isinstance(x, str) for x in v)}
    before = next((k for k in lists if _is_before(k) or k.lower().endswith("before")), None)
    after = next((k for k in lists if _is_after(k) or k.lower().endswith("after")), None)
    if not (before and after):
        return []
    questions = r.get("questions") if isinstance(r.get("questions"), list) else [""] * len(lists[before])
    return list(zip([str(q) for q in questions], lists[before], lists[after]))


def vlm_section(work: Work) -> Section:
    s, r = _open(work, "vlm", "Before / after (VLM)", NOTEBOOKS["05"])
    if r is None:
        return s
    image = vlm_image(work, r)
    if image:
        s.img(image, "the picture the VLM was taught about")
    rows = table_rows(r, VLM_TABLE_KEYS)
    pairs = vlm_pairs(r)
    if rows and pairs:  # the notebook's own table, every column of it
        columns = list(dict.fromkeys(k for row in rows for k in row))
        s.table(columns, [[row.get(c, "") for c in columns] for row in rows])
    elif pairs:
        s.table(["question", "before (stage 1)", "after (stage 2)"], [list(p) for p in pairs])
    else:
        s.p("Notebook 05 saved no before/after answers.")
    s.table(["result", "value"], _scalars(r))
    return s


def publish_section(work: Work) -> Section:
    s, r = _open(work, "publish", "Publish", NOTEBOOKS["06"])
    if r is None:
        return s
    push = _find_push(r)
    remote, commit = push.get("remote") or push.get("remote_url"), push.get("commit") or push.get("pushed_commit")
    from .publish import remote_kind

    if commit and remote and remote_kind(str(remote))["transport"] == "local":  # a folder on this machine
        s.p(f"Practice remote, not published: commit {commit} went to {remote}, a repository on this machine; "
            "push to a model hub (remote_url in notebook 06) to publish.")
    elif commit:
        s.p(f"Pushed commit {commit} to {remote}.")
    else:
        s.p("The model repository was not pushed.")
    links = [(k, _text(v)) for k, v in {**r, **push}.items()
             if isinstance(v, str) and (v.startswith(("http://", "https://", "file://", "git@")) or k.endswith(("url", "remote")))]
    s.table(["link", "where"], list(dict.fromkeys(links)))
    s.table(["fact", "value"], [(k, v) for k, v in _scalars(push) if (k, v) not in links])
    return s


def sections(work: Work) -> list[Section]:
    return [environment_section(work), data_section(work), training_section(work), evaluation_section(work),
            merge_section(work), before_after_section(work), fine_tune_cost_section(work), vlm_section(work),
            publish_section(work)]


# ---------------------------------------------------------------- writers
def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _html_block(block) -> str:
    e = html.escape
    if block[0] == "p":
        return f"<p>{e(block[1])}</p>"
    if block[0] == "table":
        head = "".join(f"<th>{e(h)}</th>" for h in block[1])
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<img src="{_data_uri(block[1])}" alt="{e(block[2])}">'


def render_html(title: str, meta: str, secs: list[Section]) -> str:
    e = html.escape
    toc = "".join(f'<li><a href="#{s.key}">{e(s.title)}</a>{"" if s.ran else " (not run)"}'
                  f'{" (from an older run)" if s.stale else ""}</li>' for s in secs)
    body = "".join(
        f'<section id="{s.key}" class="{"ran" if s.ran else "not-run-section"}{" stale-section" if s.stale else ""}">'
        f'<h2>{e(s.title)}</h2>' + (f'<p class="stale">{e(s.stale)}</p>' if s.stale else "")
        + "".join(_html_block(b) if s.ran else f'<p class="not-run">{e(b[1])}</p>' for b in s.blocks) + "</section>"
        for s in secs)
    return (f'<!DOCTYPE html>\n<html lang="zh-CN"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{e(title)}</h1><p class=\"meta\">{e(meta)}</p>"
            f"<ul>{toc}</ul>{body}</body></html>\n")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def render_markdown(title: str, meta: str, secs: list[Section], image_names: dict[Path, str]) -> str:
    out = [f"# {title}", "", meta, ""]
    for s in secs:
        out += [f"## {s.title}", ""] + ([f"**{s.stale}**", ""] if s.stale else [])
        for b in s.blocks:
            if b[0] == "p":
                out += [f"*{b[1]}*" if not s.ran else b[1], ""]
            elif b[0] == "table":
                out += ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]] + [""]
            else:
                out += [f"![{b[2]}]({image_names[b[1]]})", ""]
    return "\n".join(out)


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
                    images[b[1]] = f"{s.key}{b[1].suffix.lower()}"
                    shutil.copyfile(b[1], tmp / images[b[1]])
        (tmp / "index.html").write_text(render_html(title, meta, secs), encoding="utf-8")
        (tmp / "index.md").write_text(render_markdown(title, meta, secs, images), encoding="utf-8")
    return work.report / "index.html"


# ---------------------------------------------------------------- command line
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
