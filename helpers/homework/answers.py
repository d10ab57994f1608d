"""The checks that load a model and ask it: base + adapter on the identity questions and held-out general ones
(identity, over-fitting), final_model against base + adapter (merge), and the fine-tuned VLM about its picture."""
from __future__ import annotations

from pathlib import Path

from ..paths import Work
from .verdict import Check, Graded, _first_line, _not_run

# The grader's own identity questions: paraphrases of the course's that no training data holds. A teacher's
# hidden ones come with --questions FILE (one a line).
PARAPHRASES = ["你好，请问你是谁？", "能简单介绍一下你自己吗", "做个自我介绍吧", "你是什么助手", "你叫什么"]
IDENTITY_SHARE = 0.5  # the identity must come back on more than this share of the paraphrases
OVERFIT_SHARE = 0.5  # over-fitted: the identity leaks into more than this share of held-out general questions
GENERAL_QUESTIONS = 10  # held-out general questions asked (data/general_heldout.json)


def _ask(model, tokenizer, questions: list[str], system: str) -> dict:
    from ..generation import generate_answers

    return dict(zip(questions, generate_answers(model, tokenizer, questions, system=system)))


def grader_questions(questions_file: str | None = None) -> list[str]:
    """The course's evaluation questions and the grader's paraphrases (or the teacher's hidden ones)."""
    from ..data import DEFAULT_EVALUATION_INPUTS

    extra = PARAPHRASES
    if questions_file:
        text = Path(questions_file).read_text(encoding="utf-8")
        extra = [line.strip() for line in text.splitlines() if line.strip()]
    return list(dict.fromkeys(list(DEFAULT_EVALUATION_INPUTS) + extra))


def _system(work: Work) -> str:
    """The system prompt the adapter was trained with: its training record's, or for an adapter imported from
    XTuner, the SYSTEM of XTuner's config (kept in the adapter's chat_defaults.json)."""
    from ..base_model import ModelPathError
    from ..chat_defaults import trained_system_prompt

    try:
        return trained_system_prompt(work.adapter) or ""
    except ModelPathError:
        return ""


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
    from ..chat import general_questions
    from ..data import DEFAULT_EVALUATION_INPUTS
    from ..merge import load_model, load_tokenizer

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
    from ..chat import general_questions, leaks_identity

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
    from ..data import DEFAULT_EVALUATION_INPUTS
    from ..merge import load_model, load_tokenizer, verify_merge

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
    from ..vlm import answer_about_image, load_vlm
    from ..vlm_data import LlavaDataError, draw_control_picture, load_llava_data, scripted_qa

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
