"""Before and after: the course's models loaded once, their answers side by side, and whether the identity leaks."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from ..generation import generate_answers
from ..merge import check_adapter_dir, load_model, load_tokenizer


@dataclass
class CourseModels:
    """The models a notebook compares, each loaded once: the base model with its adapters by name (switched with
    set_adapter; all off in peft's disable_adapter() for the base itself) and final_model."""

    base: object
    final: object | None
    tokenizers: dict
    adapters: dict = field(default_factory=dict)  # the course's name of each adapter -> its name in peft

    @contextlib.contextmanager
    def use(self, name: str):
        """(model, tokenizer) as `name`: "base", "final_model", or an adapter's name on the base."""
        if name == "final_model":
            yield self.final, self.tokenizers[name]
        elif name == "base" and hasattr(self.base, "disable_adapter"):
            with self.base.disable_adapter():
                yield self.base, self.tokenizers[name]
        elif name == "base":
            yield self.base, self.tokenizers[name]
        else:
            self.base.set_adapter(self.adapters[name])
            yield self.base, self.tokenizers[name]

    def free(self, *names: str) -> None:
        """Let go of "base" and/or "final_model" once no later cell needs them (their memory returns at once)."""
        import gc

        import torch

        for name in names:
            setattr(self, "final" if name == "final_model" else name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_course_models(base_model, final_model=None, adapters: dict | None = None) -> CourseModels:
    """The base model loaded once with every adapter in `adapters` ({name: folder}, None entries skipped) on top,
    and final_model; loading goes through load_model, so bad folders get its one sentence."""
    from ..base_model import loadable_model_dir

    base_model = loadable_model_dir(base_model)
    adapters = {name: Path(folder) for name, folder in (adapters or {}).items() if folder}
    names = list(adapters)
    base = load_model(base_model, adapters[names[0]] if names else None)  # the first adapter is peft's "default"
    tokenizers, peft_names = {"base": load_tokenizer(base_model)}, {}
    for i, name in enumerate(names):
        peft_names[name] = "default" if i == 0 else name
        if i:
            base.load_adapter(check_adapter_dir(adapters[name]), adapter_name=name)
        tokenizers[name] = load_tokenizer(base_model, adapters[name])
    final = None
    if final_model is not None:
        final = load_model(final_model)
        tokenizers["final_model"] = load_tokenizer(final_model)
    return CourseModels(base, final, tokenizers, peft_names)


def before_after(base_model, final_model, evaluation_inputs: list[str], general: list[dict],
                 system: str = "", max_new_tokens: int = 64, overfitted_adapter=None,
                 models: CourseModels | None = None):
    """The same prompts answered by the base model and by final_model, side by side (a DataFrame).

    `general` holds {"input", "output"} pairs: ordinary questions with a reference answer.
    `overfitted_adapter`: a contrast adapter on the base model, answered in an "over-fitted" column.
    `models`: the notebook's models, already loaded (load_course_models, the contrast adapter named "over-fitted");
    without it they are loaded here, each once.
    """
    import pandas as pd

    questions = list(evaluation_inputs) + [g["input"] for g in general]
    kinds = ["evaluation"] * len(evaluation_inputs) + ["general"] * len(general)
    references = [""] * len(evaluation_inputs) + [g["output"] for g in general]
    if models is None:
        models = load_course_models(base_model, final_model, {"over-fitted": overfitted_adapter})
    labels = {"before": "base", "after": "final_model"}
    if overfitted_adapter:
        labels["over-fitted"] = "over-fitted"
    columns = {}
    for label, name in labels.items():
        with models.use(name) as (model, tokenizer):
            columns[label] = generate_answers(model, tokenizer, questions, system=system,
                                              max_new_tokens=max_new_tokens, label="before/after")
    return pd.DataFrame({"kind": kinds, "question": questions, **columns, "reference": references})


LEAK_RUN = 6  # characters of the identity in a row that count as the identity leaking into an answer


def leaks_identity(answer: str, identity: str) -> bool:
    """Whether `answer` repeats the identity sentence, or a run of LEAK_RUN of its characters (the over-fitted
    model often glues a piece of it onto, or in place of, an ordinary answer)."""
    from difflib import SequenceMatcher

    if identity in answer:
        return True
    match = SequenceMatcher(None, answer, identity, autojunk=False).find_longest_match(0, len(answer), 0, len(identity))
    return match.size >= min(LEAK_RUN, len(identity))


def overfitting_check(table, identity: str, column: str = "after") -> dict:
    """On general questions the model never saw: how often `column`'s model answers with its identity.
    Over-fitted: it leaks the identity into more than half of them."""
    general = table[table["kind"] == "general"]
    evaluation = table[table["kind"] == "evaluation"]
    leaked = general[column].map(lambda a: leaks_identity(a, identity))
    return {"general_questions": int(len(general)), "identity_on_general": int(leaked.sum()),
            "identity_share_on_general": float(leaked.mean()) if len(general) else 0.0,
            "general_unchanged": int((general["before"] == general[column]).sum()),
            "identity_on_evaluation": int(evaluation[column].str.contains(identity, regex=False).sum()),
            "evaluation_questions": int(len(evaluation)),
            "overfitted": bool(len(general) and leaked.mean() > 0.5)}


def general_questions(n: int | None = None) -> list[dict]:
    """Held-out general questions as {"input", "output"} pairs (data/general_heldout.json): never in the
    training mix and never in the tiny model's pre-training, so a regression on them is real."""
    from ..data import heldout_general_samples

    return heldout_general_samples()[:n]
