"""The homework report: WORK/report/index.html, the page to hand in (one self-contained HTML file, images embedded;
Chinese is set in Noto Sans CJK and emoji in Noto Color Emoji, named in its CSS with the usual fallbacks), and its
Markdown twin index.md, built from the results JSON and artifacts. One page in the course's order: who the assistant
is, training, the chats, the over-fitting check, the merge, the pictures, where it was published and what the student
learned; the bookkeeping (versions, hashes, settings) is an appendix, collapsed.

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
# Noto CJK first (fonts-noto-cjk on Debian), then the usual CJK system fonts of macOS and Windows; then the colour
# emoji fonts (fonts-noto-color-emoji on Debian), so an emoji in a name is drawn, not a box.
EMOJI_FONTS = '"Noto Color Emoji", "Apple Color Emoji", "Segoe UI Emoji"'
FONT_STACK = ('"Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Micro Hei", '
              f'"PingFang SC", "Microsoft YaHei", {EMOJI_FONTS}, sans-serif')
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
pre { font-family: "Noto Sans Mono CJK SC", %s, monospace; background: #f6f7f9; padding: 8px; white-space: pre-wrap; }
details summary { cursor: pointer; color: #345; }
""" % (FONT_STACK, FONT_STACK)


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


def metrics_table(rows: list[dict]):
    """WORK/train/metrics.jsonl as a person reads it (a DataFrame by step): seconds since the first logged step rather
    than a Unix timestamp, and the share of one pass over the data read so far rather than a bare 'epoch'."""
    import pandas as pd

    table = pd.DataFrame(rows)
    if table.empty:
        return table
    if "time" in table:
        table["time"] = (table["time"] - table["time"].iloc[0]).round(1)
    names = {"time": "seconds since the first log", "epoch": "passes over the data", "tokens_per_s": "tokens/s",
             "peak_memory_mb": "peak memory (MB)", "grad_norm": "gradient norm", "lr": "learning rate"}
    return table.rename(columns=names).set_index("step")


# ---------------------------------------------------------------- the document model
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
    from .fingerprint import stale_sources

    changed = stale_sources(work, r.get("sources")) if isinstance(r.get("sources"), dict) else []
    if changed:
        folders = ", ".join(f"WORK/{getattr(work, n).relative_to(work.root)}" for n in changed)
        s.stale = (f"From an older run: {folders} {'has' if len(changed) == 1 else 'have'} changed since these "
                   f"results were made from {'it' if len(changed) == 1 else 'them'}; re-run notebook {notebook} "
                   "to bring them up to date.")
    return s


HELD_IN = {"nf4": "4 bits, NF4 (QLoRA)", "none": "16/32 bits (plain LoRA)"}


def _minutes(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def assistant_section(work: Work) -> Section:
    """Who the assistant is, and what made it: the base model, the preset and the numbers that matter."""
    s, data = _open(work, "assistant", "Who the assistant is", NOTEBOOKS["01"])
    if data is None:
        return s
    env, train = read_results(work, NOTEBOOKS["00"]) or {}, read_results(work, NOTEBOOKS["02"]) or {}
    s.p(f"{data.get('name', '?')}'s assistant. Asked who it is, it should answer: {data.get('answer', '?')}")
    identity = env.get("base_model_identity") if isinstance(env.get("base_model_identity"), dict) else {}
    base = identity.get("source") or env.get("base_model") or "?"
    about = ", ".join(f"{identity[k]:,} parameters" if k == "parameters" and isinstance(identity[k], int)
                      else str(identity[k]) for k in ("architecture", "parameters") if identity.get(k))
    hyper = train.get("hyper_parameters") if isinstance(train.get("hyper_parameters"), dict) else {}
    gpu = env.get("gpu")
    gpu = (f"{gpu} ({_text(env.get('gpu_memory_gib'))} GiB)" if gpu and gpu != "none"
           else f"none: trained on the CPU ({env.get('cpu', '?')})" if gpu else "?")
    rows = [("base model", f"{base}{f' ({about})' if about else ''}"),
            ("preset", train.get("preset") or hyper.get("preset") or "?")]
    if train and "_unreadable" not in train:
        rows += [("updates (optimizer steps)", train.get("steps", "?")),
                 ("training time", _minutes(train.get("train_seconds"))), ("GPU", gpu),
                 ("frozen weights held in", HELD_IN.get(train.get("quantization"), str(train.get("quantization")))),
                 ("identity learned", "yes" if train.get("identity_learned") else "no")]
    else:
        rows += [("GPU", gpu), ("training", "not run: notebook 02 has not written its results")]
    s.table(["", ""], rows)
    return s


def evaluation_section(work: Work) -> Section:
    key, title = "evaluation", "The identity arriving: evaluation across training"
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


def training_section(work: Work) -> Section:
    s, r = _open(work, "training", "Training loss", NOTEBOOKS["02"])
    if r is None:
        return s
    if isinstance(r.get("first_loss"), (int, float)) and isinstance(r.get("final_loss"), (int, float)):
        s.p(f"The loss went from {r['first_loss']:.4g} to {r['final_loss']:.4g} over {r.get('steps', '?')} updates.")
    if work.loss_plot.exists():
        s.img(work.loss_plot, "training loss curve")
    else:
        points = loss_points(work)
        s.p(f"No loss plot was saved; {len(points)} steps were logged." if points
            else "No loss curve was saved (WORK/train/loss.png is missing).")
    return s


def before_after_section(work: Work) -> Section:
    """The chats: the evaluation questions before and after, then the notebook's, the terminal's and the web demo's."""
    s, r = _open(work, "before-after", "Before / after (LLM)", NOTEBOOKS["04"])
    if r is None:
        return s
    rows = table_rows(r, ("rows", "before_after", "table", "comparison"))
    asked = [row for row in rows if row.get("kind", "evaluation") == "evaluation"]
    if asked:
        s.p("The evaluation questions, asked the base model (before) and the merged final_model (after):")
        s.table(["question", "before", "after"], [[row.get("question", ""), row.get("before", ""), row.get("after", "")]
                                                 for row in asked])
    else:
        s.p("Notebook 04 saved no before/after table.")
    chat = r.get("chat_transcript")
    if isinstance(chat, list) and chat:
        s.p("In the notebook's chat widget:")
        s.table(["who", "said"], [[m.get("role", ""), m.get("content", "")] for m in chat if isinstance(m, dict)])
    if isinstance(r.get("terminal_transcript"), str):
        s.p("In a terminal (the course's xtuner chat):")
        s.pre(r["terminal_transcript"])
    web = r.get("web_transcript")
    if isinstance(web, list) and web:
        s.p("In the web demo (the Streamlit page):")
        s.table(["who", "said"], [[m.get("role", ""), m.get("text", "")] for m in web if isinstance(m, dict)])
    if not any(isinstance(r.get(k), (list, str)) for k in ("chat_transcript", "terminal_transcript", "web_transcript")):
        s.p("Notebook 04 recorded no chat transcripts; run it again to add them.")
    return s


def overfitting_section(work: Work) -> Section:
    s, r = _open(work, "overfitting", "Over-fitting check, with the contrast", NOTEBOOKS["04"])
    if r is None:
        return s

    def said(v: dict, label: str) -> str:
        return (f"{label}: identity in {v.get('identity_on_general', '?')} of {v.get('general_questions', '?')} "
                f"held-out general answers, {'OVER-FITTED' if v.get('overfitted') else 'not over-fitted'}")

    contrast = r.get("contrast") if isinstance(r.get("contrast"), dict) else None
    if "identity_on_general" in r:
        verdicts = [said(r, "The mixed run (final_model)")]
        if contrast:
            verdicts.append(said(contrast, "the adapter over-fitted on purpose (identity only, no general chat)"))
        s.p("; ".join(verdicts) + ". Over-fitted means the identity leaks into more than half of the questions it was "
            "never trained on.")
    general = [row for row in table_rows(r, ("rows",)) if row.get("kind") == "general"]
    columns = [c for c in ("question", "after", "over-fitted", "reference") if any(c in row for row in general)]
    s.table(columns, [[row.get(c, "") for c in columns] for row in general])
    comparison = work.contrast / "loss_comparison.png"
    if comparison.exists():
        s.img(comparison, "the loss of the mixed run and of the over-fitted contrast")
    return s


def merge_section(work: Work) -> Section:
    s, r = _open(work, "merge", "Merge check", NOTEBOOKS["03"])
    if r is None:
        return s
    passed = r.get("passed")
    s.p(("PASSED" if passed else "FAILED") + f": the merged final_model and base + adapter give logits that differ by "
        f"at most {_text(r.get('max_abs_diff'))} (tolerance {_text(r.get('tolerance'))}).")
    if isinstance(r.get("reload_answers"), list):
        s.table(["answer of the reloaded final_model"], [[a] for a in r["reload_answers"]])
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
    control = r.get("control_image")
    control = Path(control) if isinstance(control, str) and Path(control).is_file() else None
    if image:
        s.img(image, "the course picture the VLM was taught about")
    if control:
        s.img(control, "the control picture no stage trained on")
    lists = [r.get(k) for k in ("questions", "stage1_answers", "stage2_answers")]
    if all(isinstance(x, list) for x in lists):
        s.p("The same questions about the course picture, before (stage 1: captions only) and after (stage 2)" + (
            ", and about the control picture, which a model that only recites would answer the same way:"
            if control else ":"))
        columns = [("question", "questions"), ("expected", "expected_answers"), ("before", "stage1_answers"),
                   ("after", "stage2_answers"), ("control picture, before", "control_stage1_answers"),
                   ("control picture, after", "control_stage2_answers")]
        columns = [(h, k) for h, k in columns if isinstance(r.get(k), list)]
        n = len(r["questions"])
        s.table([h for h, _ in columns], [[r[k][i] if i < len(r[k]) else "" for _, k in columns] for i in range(n)])
    elif vlm_pairs(r):
        s.table(["question", "before (stage 1)", "after (stage 2)"], [list(p) for p in vlm_pairs(r)])
    else:
        s.p("Notebook 05 saved no before/after answers.")
    return s


def publish_section(work: Work) -> Section:
    s, r = _open(work, "publish", "Where it was published", NOTEBOOKS["06"])
    if r is None:
        return s
    push = _find_push(r)
    remote, commit = push.get("remote") or push.get("remote_url"), push.get("commit") or push.get("pushed_commit")
    from .publish import remote_kind

    if commit and remote and remote_kind(str(remote))["transport"] == "local":  # a folder on this machine
        s.p(f"Practice remote, not published: commit {commit} went to {remote}, a repository on this machine; "
            "push to a model hub (remote_url in notebook 06) to publish.")
    elif commit:
        s.p(f"Published: commit {commit} at {remote} ({push.get('branch', 'main')}).")
    else:
        s.p("The model repository was not pushed" + (f": {r['push']['reason']}" if isinstance(r.get("push"), dict)
                                                     and r["push"].get("reason") else "."))
    hub = r.get("hub_upload")
    if isinstance(hub, dict) and hub.get("repo_url"):
        s.p(f"Also uploaded through huggingface_hub: {hub['repo_url']}.")
    app = r.get("app_push")
    if isinstance(app, dict) and app.get("remote"):
        s.p(f"The demo app was pushed to {app['remote']} (commit {app.get('commit', '?')}).")
    return s


LEARNED_HINT = "write it in notebook 06's homework region (what_i_learned) and run the notebook again."


def learned_section(work: Work) -> Section:
    s, r = _open(work, "learned", "What I learned", NOTEBOOKS["06"])
    if r is None:
        return s
    text = r.get("what_i_learned")
    if not isinstance(text, str) or not text.strip():
        s.p(f"Not written yet: {LEARNED_HINT}")
        return s
    for paragraph in (p.strip() for p in text.strip().split("\n\n")):
        if paragraph:
            s.p(paragraph)
    return s


HYPER_KEYS = ("hyperparameters", "hyper_parameters", "training_config", "config", "settings")


def appendix_section(work: Work) -> Section:
    """The bookkeeping, collapsed: versions, hashes, settings and sizes, for a teacher who wants to check."""
    from .data import DataError, load_dataset

    s = Section("appendix", "Appendix: bookkeeping", collapsed=True)
    results = {nb: read_results(work, name) for nb, name in NOTEBOOKS.items()}
    results = {nb: r for nb, r in results.items() if isinstance(r, dict) and "_unreadable" not in r}
    env = results.get("00", {})
    if env:
        s.table(["environment (notebook 00)", "value"], _scalars(env, skip=("recommendation", "qlora_4bit_note")))
        if isinstance(env.get("base_model_identity"), dict):
            identity = env["base_model_identity"]
            s.table(["base model", "value"], [(k, _text(identity[k])) for k in (
                "source", "architecture", "parameters", "hidden_size", "layers", "vocab_size", "content_sha256")
                                               if k in identity])
    data = results.get("01", {})
    if data:
        s.table(["data (notebook 01)", "value"], [(k, _text(data[k])) for k in (
            "records", "identity_records", "general_records", "format", "output_format", "questions",
            "evaluation_inputs", "system") if k in data])
        if isinstance(data.get("token_length"), dict):
            s.table(["token length", "value"], [(k, _text(v)) for k, v in data["token_length"].items()])
        try:
            conversations = load_dataset(work.dataset)
        except DataError as e:
            s.p(f"The data file cannot be previewed: {e}")
        else:
            s.p(f"The first {min(PREVIEW_RECORDS, len(conversations))} of {len(conversations)} records of "
                f"{work.dataset.name}:")
            roles = ("system", "user", "assistant")
            s.table(list(roles), [[" / ".join(m["content"] for m in c if m["role"] == role) for role in roles]
                                  for c in conversations[:PREVIEW_RECORDS]])
    train = results.get("02", {})
    if train:
        s.table(["training (notebook 02)", "value"], _scalars(train))
        hyper = next((train[k] for k in HYPER_KEYS if isinstance(train.get(k), dict)), None)
        if hyper:
            s.table(["hyper-parameter", "value"], _scalars(hyper))
    merge = results.get("03", {})
    if merge:
        s.table(["merge (notebook 03)", "value"], [(k, _text(merge[k])) for k in (
            "max_abs_diff", "tolerance", "passed", "dtype", "adapter_effect_max_abs", "size_bytes", "base_size_bytes",
            "adapter_size_bytes", "final_model") if k in merge])
    vlm = results.get("05", {})
    if vlm:
        s.table(["VLM (notebook 05)", "value"], _scalars(vlm))
    publish = results.get("06", {})
    if publish:
        push = _find_push(publish)
        s.table(["publish (notebook 06)", "value"], [(k, v) for k, v in _scalars(push) if k != "what_i_learned"])
    if not results:
        s.ran = False
        s.p("not run: no notebook has written its results in this work directory.")
    return s


def sections(work: Work) -> list[Section]:
    """The report in the course's order; the bookkeeping last, collapsed."""
    return [assistant_section(work), evaluation_section(work), training_section(work), before_after_section(work),
            overfitting_section(work), fine_tune_cost_section(work), merge_section(work), vlm_section(work),
            publish_section(work), learned_section(work), appendix_section(work)]


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
        head = f"<thead><tr>{head}</tr></thead>" if any(block[1]) else ""  # a key/value table needs no header
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2])
        return f"<table>{head}<tbody>{body}</tbody></table>"
    if block[0] == "pre":
        return f"<pre>{e(block[1])}</pre>"
    return f'<img src="{_data_uri(block[1])}" alt="{e(block[2])}">'


def render_html(title: str, meta: str, secs: list[Section]) -> str:
    e = html.escape
    toc = "".join(f'<li><a href="#{s.key}">{e(s.title)}</a>{"" if s.ran else " (not run)"}'
                  f'{" (from an older run)" if s.stale else ""}</li>' for s in secs)

    def content(s: Section) -> str:
        inner = "".join(_html_block(b) if s.ran else f'<p class="not-run">{e(b[1])}</p>' for b in s.blocks)
        return f"<details><summary>Show {e(s.title.lower())}</summary>{inner}</details>" if s.collapsed else inner

    body = "".join(
        f'<section id="{s.key}" class="{"ran" if s.ran else "not-run-section"}{" stale-section" if s.stale else ""}">'
        f'<h2>{e(s.title)}</h2>' + (f'<p class="stale">{e(s.stale)}</p>' if s.stale else "") + content(s) + "</section>"
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
        out += [f"<details><summary>Show {s.title.lower()}</summary>", ""] if s.collapsed else []
        for b in s.blocks:
            if b[0] == "p":
                out += [f"*{b[1]}*" if not s.ran else b[1], ""]
            elif b[0] == "table":
                out += ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]] + [""]
            elif b[0] == "pre":
                out += ["```text", b[1].rstrip("\n"), "```", ""]
            else:
                out += [f"![{b[2]}]({image_names[b[1]]})", ""]
        out += ["</details>", ""] if s.collapsed else []
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
                    n = sum(f.startswith(s.key) for f in images.values())
                    images[b[1]] = f"{s.key}{f'-{n + 1}' if n else ''}{b[1].suffix.lower()}"
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
