"""The report's sections in the course's order, from who the assistant is to what the student learned."""
from __future__ import annotations

from pathlib import Path

from ..paths import Work
from ..results import read_results, table_rows
from .document import Section, _marked_if_stale, _not_run, _open, _unreadable
from .records import NOTEBOOKS, _find_push, _text, evaluation_rounds, loss_points, vlm_image

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
    from ..publish import remote_kind

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
