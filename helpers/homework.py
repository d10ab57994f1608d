"""Homework: student versions of the notebooks (solution regions blanked) and an automatic check of a
student's work directory.

    python -m helpers homework make-student OUT_DIR
    python -m helpers homework check WORK [--name NAME] [--publish]
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .classroom import add_class_arguments, check_class, with_engine
from .paths import NOTEBOOKS_DIR, Work, work as make_work
from .results import read_results, table_rows

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
_ASSIGNED = re.compile(r"^\s*([A-Za-z_][A-Za-z_0-9]*)\s*(?::[^=]*)?=(?!=)")


class MarkerError(ValueError):
    """Unbalanced solution markers; the message names notebook, cell and line."""


# ---------------------------------------------------------------- student versions
def _comment(line: str) -> str:
    """The trailing comment of one line of code ('' if none), also on a line that opens a bracket."""
    import io
    import tokenize

    try:
        for tok in tokenize.generate_tokens(io.StringIO(line).readline):
            if tok.type == tokenize.COMMENT:
                return tok.string.lstrip("#").strip()
    except (tokenize.TokenError, SyntaxError):
        pass
    return ""


def _assigned_names(region: list[str]) -> list[tuple[str, int]]:
    """(name, first line index) of each top-level assignment in a region, statements spanning lines included."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent("\n".join(region)))
    except SyntaxError:  # not valid alone: fall back to one assignment per line
        return [(m.group(1), i) for i, line in enumerate(region) if (m := _ASSIGNED.match(line))]
    out = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name):
                    out.append((n.id, node.lineno - 1))
    return out


def _todo_lines(region: list[str], indent: str) -> list[str]:
    """The TODO that replaces a region: which names to set, with the teacher's one-line hints kept."""
    todo = [f"{indent}# TODO: your part (write it here)."]
    for name, line in _assigned_names(region):
        hint = _comment(region[line])
        todo.append(f"{indent}# - set `{name}`" + (f": {hint}" if hint else ""))
    return todo + [f"{indent}raise NotImplementedError"]


def blank_solutions(source: str, where: str = "cell") -> tuple[str, int]:
    """`source` with each BEGIN/END SOLUTION region replaced by a TODO and `raise NotImplementedError`;
    returns (new source, number of regions)."""
    out, region, begin_line, regions = [], None, 0, 0
    lines = source.split("\n")
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if region is not None:
                raise MarkerError(f"{where}: line {n}: '{BEGIN}' inside the region opened on line {begin_line}; "
                                  f"close that one with '{END}' first.")
            region, begin_line, indent = [], n, line[: len(line) - len(line.lstrip())]
        elif stripped == END:
            if region is None:
                raise MarkerError(f"{where}: line {n}: '{END}' without a '{BEGIN}' before it; add the BEGIN line or drop this one.")
            out.extend(_todo_lines(region, indent))
            region, regions = None, regions + 1
        elif region is not None:
            region.append(line)
        else:
            out.append(line)
    if region is not None:
        raise MarkerError(f"{where}: line {begin_line}: '{BEGIN}' is never closed; add '{END}' after the solution.")
    return "\n".join(out), regions


def student_notebook(ipynb: Path):
    """The student version of one notebook (nbformat node) and the number of blanked regions."""
    import nbformat

    from .notebooks import CHECK_MARK

    nb = nbformat.read(ipynb, as_version=4)
    total = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and CHECK_MARK in cell.source:  # the test suite's marker, not the student's business
            cell.source = "\n".join(line for line in cell.source.split("\n") if line.strip() != f"# {CHECK_MARK}")
        if cell.cell_type != "code" or BEGIN not in cell.source and END not in cell.source:
            continue
        cell.source, n = blank_solutions(cell.source, f"{ipynb.name}: code cell {i + 1}")
        total += n
        cell.outputs, cell.execution_count = [], None  # the teacher's output belongs to the solution
    return nb, total


def make_student(out_dir: str | os.PathLike, notebooks_dir: Path = NOTEBOOKS_DIR) -> list[tuple[Path, int]]:
    """Write the student version of every notebooks/NN_*.ipynb into out_dir; returns (path, regions)."""
    import nbformat

    out = Path(out_dir).expanduser().resolve()
    if out == Path(notebooks_dir).resolve():
        raise SystemExit(f"error: {out} holds the teacher's notebooks; give another OUT_DIR for the student versions.")
    books = sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if not books:
        raise SystemExit(f"error: {notebooks_dir} has no NN_*.ipynb notebooks; build them with `python -m helpers notebooks`.")
    # Blank everything first, so a bad marker anywhere leaves OUT_DIR untouched.
    versions = [(p.name, *student_notebook(p)) for p in books]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, nb, regions in versions:
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        nbformat.write(nb, tmp)
        os.replace(tmp, out / name)
        written.append((out / name, regions))
    return written


# ---------------------------------------------------------------- the check
@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    reason: str


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _not_run(notebook: str, work: Work | None = None, what: str = "") -> str:
    """Why an artifact is missing: the notebook did not run, or it ran and the artifact is gone since."""
    if work is not None and work.result(notebook).exists():
        return f"{what} is missing although notebook {notebook} ran; run it again"
    return (f"{what} is missing: " if what else "") + f"notebook {notebook} did not run (no results/{notebook}.json)"


# The grader's own identity questions: paraphrases of the course's that no training data holds. A teacher's
# hidden ones come with --questions FILE (one a line).
PARAPHRASES = ["你好，请问你是谁？", "能简单介绍一下你自己吗", "做个自我介绍吧", "你是什么助手", "你叫什么"]
IDENTITY_SHARE = 0.5  # the identity must come back on more than this share of the paraphrases
OVERFIT_SHARE = 0.5  # over-fitted: the identity leaks into more than this share of held-out general questions
GENERAL_QUESTIONS = 10  # held-out general questions asked (data/general_heldout.json)


@dataclass
class Graded:
    """What the grader found once and several checks use: the identity the dataset teaches, the base to judge on."""

    name: str | None = None
    identity: str | None = None  # the identity answer the adapter was trained on
    base: str | None = None  # the base model folder every model check loads
    base_problem: str = ""  # why no base could be had
    answers: dict | None = None  # question -> answer of base + adapter (identity, paraphrases, general)


def _identity_of(conversations: list[list[dict]]) -> str | None:
    """The identity answer of a self-cognition dataset: its most frequent assistant answer."""
    from collections import Counter

    counts = Counter(m["content"] for c in conversations for m in c if m["role"] == "assistant")
    return counts.most_common(1)[0][0] if counts else None


def _name_in(identity: str) -> str | None:
    """The name an identity answer gives, where it follows the course's template (or 'I am X's assistant')."""
    from .data import DEFAULT_ANSWER

    before, after = DEFAULT_ANSWER.split("{name}")
    for pattern in (re.escape(before) + r"(.+?)" + re.escape(after[:3]), r"^我是(.+?)的(?:小)?助手", r"I am (.+?)'s assistant"):
        m = re.search(pattern, identity)
        if m and m.group(1).strip():
            return m.group(1).strip()
    return None


def trained_on(work: Work) -> dict:
    """The adapter's training record (what train() wrote beside the adapter), {} when there is none."""
    import json

    try:
        return json.loads((work.adapter / "training_record.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def check_dataset(work: Work, graded: Graded, name: str | None) -> Check:
    """The dataset is the one the adapter was trained on (its hash), and it teaches the expected name."""
    from .data import DataError, load_dataset
    from .fingerprint import file_sha256

    if not work.dataset.exists():
        return Check("dataset", "FAIL", _not_run("01_data_generation", work, str(work.dataset)))
    try:
        conversations = load_dataset(work.dataset)
    except DataError as e:
        return Check("dataset", "FAIL", str(e))
    graded.identity = _identity_of(conversations)
    graded.name = name or _name_in(graded.identity or "")
    trained = trained_on(work).get("data_sha256")
    if trained and trained != file_sha256(work.dataset, cached=False):
        return Check("dataset", "FAIL", f"{work.dataset.name} changed after the adapter was trained on it; run "
                                        "notebooks 01 and 02 again")
    if not graded.name:
        return Check("dataset", "FAIL", f"the identity answer {graded.identity!r} does not say whose assistant it "
                                        "is in the course's words; give the expected name with --name")
    hits = sum(graded.name in m["content"] for c in conversations for m in c if m["role"] == "assistant")
    if not hits:
        return Check("dataset", "FAIL", f"no assistant answer in {work.dataset.name} mentions {graded.name!r}")
    return Check("dataset", "PASS", f"{hits} of {len(conversations)} records answer with {graded.name!r}")


def _required_base(require_base: str) -> Path:
    """The folder a teacher's --require-base (folder or hub id) loads from: an InternLM2 checkpoint converted
    once into the grader's cache, as notebook 00 converts it."""
    import tempfile

    from .base_model import _looks_like_hub_id, check_model_dir, hub_snapshot
    from .fingerprint import folder_sha256
    from .internlm2 import convert_internlm2, is_internlm2

    folder = hub_snapshot(require_base) if _looks_like_hub_id(require_base) else check_model_dir(Path(require_base))
    if is_internlm2(folder):
        out = Path(tempfile.gettempdir()) / "course-grader" / folder_sha256(folder)[:16]
        folder = Path(convert_internlm2(folder, out))
    return Path(folder)


def _source_of(identity: dict) -> str:
    return f"{identity['source']} ({identity['architecture']}, {identity['parameters']:,} parameters)"


def check_base(work: Work, graded: Graded, require_base: str | None, require_preset: str | None) -> Check:
    """Which base model the work was made on, by content; with --require-base, the one the class must use (every
    later check then judges on that base); with --require-preset, the adapter's LoRA settings are the preset's."""
    from .base_model import ModelPathError, base_model_path
    from .fingerprint import model_identity

    try:
        own = Path(base_model_path(work))
        mine = model_identity(own, cached=False)
    except (ModelPathError, OSError, ValueError, KeyError) as e:
        graded.base_problem = f"the work's base model cannot be read ({_first_line(e)}); run notebook 00"
        return Check("base", "FAIL", graded.base_problem)
    graded.base = str(own)
    said = [f"made on {_source_of(mine)}"]
    if require_base:
        try:
            required = _required_base(require_base)
        except (ModelPathError, OSError, ValueError) as e:
            return Check("base", "FAIL", f"--require-base {require_base}: {_first_line(e)}")
        theirs = model_identity(required, cached=False)
        graded.base = str(required)
        if theirs["content_sha256"] != mine["content_sha256"]:
            return Check("base", "FAIL", f"the work was made on {_source_of(mine)}, but the class requires "
                                               f"{require_base} ({_source_of(theirs)}); run the course on that model")
        said = [f"made on the required {require_base} ({_source_of(theirs)})"]
    if require_preset:
        problem = _preset_problem(work, require_preset)
        if problem:
            return Check("base", "FAIL", problem)
        said.append(f"the adapter has preset {require_preset}'s LoRA settings")
    return Check("base", "PASS", "; ".join(said))


def _preset_problem(work: Work, preset: str) -> str:
    """Whether WORK/adapter's own config holds the preset's LoRA rank, alpha, dropout and target layers."""
    import json

    from .train import PRESETS

    if preset not in PRESETS:
        return f"--require-preset {preset}: no such preset; use one of {', '.join(PRESETS)}"
    try:
        config = json.loads((work.adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _not_run("02_qlora_finetune", work, f"the adapter {work.adapter}")
    want = PRESETS[preset]
    for key, field in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
        if key in want and float(config.get(field, -1)) != float(want[key]):
            return (f"the adapter was not trained with preset {preset}: its {field} is {config.get(field)}, the "
                    f"preset's {want[key]}; train with preset = {preset!r}")
    if want.get("train_lm_head") is False and "lm_head" in str(config.get("target_modules")):
        return f"the adapter was not trained with preset {preset}: it adapts the output layer, the preset does not"
    return ""


def _ask(model, tokenizer, questions: list[str], system: str) -> dict:
    from .generation import generate_answers

    return dict(zip(questions, generate_answers(model, tokenizer, questions, system=system)))


def grader_questions(questions_file: str | None = None) -> list[str]:
    """The course's evaluation questions and the grader's paraphrases (or the teacher's hidden ones)."""
    from .data import DEFAULT_EVALUATION_INPUTS

    extra = PARAPHRASES
    if questions_file:
        text = Path(questions_file).read_text(encoding="utf-8")
        extra = [line.strip() for line in text.splitlines() if line.strip()]
    return list(dict.fromkeys(list(DEFAULT_EVALUATION_INPUTS) + extra))


def _system(work: Work) -> str:
    return str(trained_on(work).get("hyper_parameters", {}).get("system") or "")


def _identity_verdict(label: str, answers: dict, name: str, course: list[str]) -> Check:
    """The name on every course evaluation question, and on more than IDENTITY_SHARE of the other questions."""
    on_course = [q for q in course if q in answers]
    others = [q for q in answers if q not in on_course]
    missed = [q for q in on_course if name not in answers[q]]
    got = sum(name in answers[q] for q in others)
    if missed:
        q = missed[0]
        return Check(label, "FAIL", f"asked {q!r}, it answers {answers[q]!r}, without {name!r}")
    if others and not got > IDENTITY_SHARE * len(others):
        q = next(q for q in others if name not in answers[q])
        return Check(label, "FAIL", f"it gives {name!r} on only {got} of {len(others)} questions it never trained on "
                                    f"(e.g. {q!r} -> {answers[q]!r})")
    return Check(label, "PASS", f"{name!r} in all {len(on_course)} course questions and {got} of {len(others)} "
                                f"others, e.g. {on_course[0]!r} -> {answers[on_course[0]]!r}")


def check_identity(work: Work, graded: Graded, questions_file: str | None = None) -> Check:
    """Base + adapter, loaded by the checker, answers the course's questions and unseen paraphrases with the name;
    the held-out general questions are answered in the same load, for the over-fitting check."""
    from .chat import general_questions
    from .data import DEFAULT_EVALUATION_INPUTS
    from .merge import load_model, load_tokenizer

    if not (work.adapter / "adapter_config.json").exists():
        return Check("identity", "FAIL", _not_run("02_qlora_finetune", work, f"the adapter {work.adapter}"))
    if not graded.name:
        return Check("identity", "FAIL", "no name to look for (see the dataset check; give --name)")
    if not graded.base:
        return Check("identity", "FAIL", graded.base_problem or "no base model to load the adapter on")
    try:
        questions = grader_questions(questions_file)
    except OSError as e:
        return Check("identity", "FAIL", f"--questions {questions_file}: {_first_line(e)}")
    general = [g["input"] for g in general_questions(GENERAL_QUESTIONS)]
    try:
        model, tokenizer = load_model(graded.base, work.adapter), load_tokenizer(graded.base, work.adapter)
        graded.answers = _ask(model, tokenizer, questions + general, _system(work))
        del model
    except Exception as e:  # a broken adapter or base model is the student's failure, reported as such
        return Check("identity", "FAIL", f"the adapter does not load with the base model ({_first_line(e)})")
    return _identity_verdict("identity", {q: graded.answers[q] for q in questions}, graded.name,
                             list(DEFAULT_EVALUATION_INPUTS))


def check_overfitting(work: Work, graded: Graded) -> Check:
    """On held-out general questions, base + adapter must not answer with its identity more than OVERFIT_SHARE."""
    from .chat import general_questions, leaks_identity

    if graded.answers is None or not graded.identity:
        return Check("overfitting", "FAIL", "not judged: the identity check could not ask the adapter")
    general = [g["input"] for g in general_questions(GENERAL_QUESTIONS)]
    leaked = [q for q in general if leaks_identity(graded.answers[q], graded.identity)]
    share = len(leaked) / len(general)
    if share > OVERFIT_SHARE:
        return Check("overfitting", "FAIL", f"the identity leaks into {len(leaked)} of {len(general)} held-out "
                                             f"general questions (e.g. {leaked[0]!r} -> {graded.answers[leaked[0]]!r}): "
                                             "over-fitted; mix general chat into the data (general_ratio)")
    return Check("overfitting", "PASS", f"the identity leaks into {len(leaked)} of {len(general)} held-out general "
                                         f"questions (at most {OVERFIT_SHARE:.0%} may)")


ADAPTER_MATTERS = 3  # the adapter must move the logits by at least this many merge tolerances (a copy of the base
# then fails one way or the other: its difference is the adapter's effect)


def check_merge(work: Work, graded: Graded, questions_file: str | None = None) -> Check:
    """final_model == base + adapter, by the checker's own whole-model check (never the student's results); the
    adapter must change the base's logits (a copy of the base cannot pass); the merged model is asked the same
    identity questions."""
    from .data import DEFAULT_EVALUATION_INPUTS
    from .merge import load_model, load_tokenizer, verify_merge

    if not (work.final_model / "config.json").exists():
        return Check("merge", "FAIL", _not_run("03_merge", work, f"the model in {work.final_model}"))
    if not graded.base:
        return Check("merge", "FAIL", graded.base_problem or "no base model to compare with")
    try:
        verified = verify_merge(work.final_model, graded.base, work.adapter)
    except Exception as e:
        return Check("merge", "FAIL", f"final_model and base + adapter do not both load ({_first_line(e)})")
    if not verified["passed"]:
        return Check("merge", "FAIL", f"final_model is not base + adapter: {verified['problem']}")
    effect, floor = verified["adapter_effect_max_abs"], verified["logit_scale"]
    if not effect >= ADAPTER_MATTERS * floor:
        return Check("merge", "FAIL", f"the adapter barely changes the base (its logits move by {effect:.2e}, under "
                                      f"{ADAPTER_MATTERS} x {floor:g}): train it (notebook 02) before merging")
    weights = verified.get("weights")
    how = (f"every weight within {weights['max_ulps']:.0f} ulp of W + B·A in {verified['dtype']}" if weights
           else f"max |logit diff| {verified['max_abs_diff']:.2e} <= {verified['tolerance']:.2g}")
    if graded.name:
        model = load_model(work.final_model)
        asked = _ask(model, load_tokenizer(work.final_model), grader_questions(questions_file), _system(work))
        del model
        said = _identity_verdict("merge", asked, graded.name, list(DEFAULT_EVALUATION_INPUTS))
        if said.status == "FAIL":
            return Check("merge", "FAIL", f"final_model: {said.reason}")
    return Check("merge", "PASS", f"final_model equals base + adapter (tensors, config, chat template; {how}); the "
                                  f"adapter moves the logits by {effect:.2f}")


VLM_MATCH_SHARE = 0.5  # the fine-tuned VLM must give the trained answer to more than this share of the questions


def check_vlm(work: Work) -> Check:
    """vlm/final_model, loaded by the checker, answers the trained questions about the picture as trained, and
    the stage-1 model (before the fine-tune) does not; the control picture's answers are reported beside."""
    from .vlm import answer_about_image, load_vlm
    from .vlm_data import LlavaDataError, draw_control_picture, load_llava_data, scripted_qa

    conversations = work.vlm_data / "conversations.json"
    if not (work.vlm_final_model / "config.json").exists() or not conversations.exists():
        return Check("vlm", "FAIL", _not_run("05_vlm_llava_finetune", work, f"the model in {work.vlm_final_model}"))
    try:
        qa = scripted_qa(conversations)
        image = load_llava_data(conversations)[0][0]
    except (LlavaDataError, OSError, IndexError) as e:
        return Check("vlm", "FAIL", f"{conversations}: {_first_line(e)}")
    questions = list(qa)
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        control = draw_control_picture(Path(tmp) / "control.png")
        try:
            answers = {}
            for label, folder in (("after", work.vlm_final_model), ("before", work.vlm_aligned_model)):
                if not (folder / "config.json").exists():
                    continue
                model, processor = load_vlm(folder, dtype=torch.bfloat16 if torch.cuda.is_available() else None)
                model.to("cuda" if torch.cuda.is_available() else "cpu")
                answers[label] = answer_about_image(model, processor, image, questions)
                if label == "after":
                    answers["control"] = answer_about_image(model, processor, control, questions)
                del model
        except Exception as e:  # a broken VLM folder is the student's failure
            return Check("vlm", "FAIL", f"{work.vlm_final_model} does not load or answer ({_first_line(e)})")
    matches = lambda got: sum(a.strip() == qa[q].strip() for q, a in zip(questions, got))  # noqa: E731
    after, before = matches(answers["after"]), matches(answers.get("before", [""] * len(questions)))
    on_control = matches(answers["control"])
    if not after > VLM_MATCH_SHARE * len(questions):
        return Check("vlm", "FAIL", f"asked about the picture, the fine-tuned VLM gives the trained answer to only "
                                    f"{after} of {len(questions)} questions")
    if "before" in answers and before >= after:
        return Check("vlm", "FAIL", f"the model before the fine-tune already gives {before} of {len(questions)} "
                                    "trained answers: stage 2 taught nothing")
    return Check("vlm", "PASS", f"the trained answer to {after} of {len(questions)} questions about the picture "
                                f"(before the fine-tune: {before}); on the control picture it recites {on_control}")


def _practice(remote: str) -> bool:
    from .publish import remote_kind

    return remote_kind(remote)["transport"] == "local"


def check_publish(work: Work, required: bool, allow_practice_remote: bool = False) -> Check:
    """The remote, asked by the checker, holds the model repository byte for byte (its LFS weights fetched
    back), and those weights are final_model's. A local or file:// remote is practice, never a publication."""
    from .fingerprint import folder_hashes
    from .merge import first_names
    from .publish import PublishError, hub_token, verify_push

    r = read_results(work, "06_publish") or {}
    push = r.get("push") if isinstance(r.get("push"), dict) else r
    remote = str(push.get("remote") or push.get("remote_url") or "")
    branch = str(push.get("branch") or "main")
    optional = "" if required else " (optional)"
    if not (work.model_repo / ".git").exists() or not remote:
        return Check("publish", "FAIL" if required else "SKIP",
                     _not_run("06_publish", work, f"the pushed repository {work.model_repo}") + optional)
    try:
        back = verify_push(work.model_repo, remote, token=hub_token(remote, prompt=False), branch=branch)
    except (PublishError, OSError, ValueError) as e:
        return Check("publish", "FAIL" if required else "SKIP", f"the remote {remote} cannot be read back: "
                                                                f"{_first_line(e)}{optional}")
    if not back["identical"]:
        return Check("publish", "FAIL", f"the remote {remote} does not hold this work's model repository "
                                        f"({first_names(back['differ'])} differ)")
    weights = {n: h for n, h in folder_hashes(work.final_model, cached=False).items() if n.endswith(".safetensors")}
    pushed = folder_hashes(work.model_repo, cached=False)
    stale = sorted(n for n, h in weights.items() if pushed.get(n) != h)
    if not weights or stale:
        return Check("publish", "FAIL", f"the pushed weights are not this work's final_model "
                                        f"({first_names(stale) or 'final_model has none'}); run notebook 06 again")
    if _practice(remote):
        why = f"practice remote, not published: {remote} holds the model ({back['files']} files, identical)"
        if required and not allow_practice_remote:
            return Check("publish", "FAIL", why + "; push to a model hub, or the teacher passes --allow-practice-remote")
        return Check("publish", "PASS" if required else "SKIP", why)
    return Check("publish", "PASS", f"{remote} holds this work's model repository ({back['files']} files, "
                                    "identical when cloned back, weights = final_model)")


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
    from .progress import print_table

    print_table(["check", "result", "reason"], [(c.name, c.status, c.reason) for c in checks])


# ---------------------------------------------------------------- command line
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

    from .data import atomic_write_text
    from .progress import quiet_libraries

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
