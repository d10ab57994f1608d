"""The model card: README.md of the model repository, from the results of notebooks 00-04, and its notebook view."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..paths import Work
from ..results import read_results, table_rows
from .remote import _safe_url

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _results(work: Work, notebook: str) -> dict:
    """A notebook's results for the card; {} when it did not run or cannot be read (the card leaves it out)."""
    r = read_results(work, notebook)
    return r if r and "_unreadable" not in r else {}


def _cell(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of dict rows ("" when there are none)."""
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return ""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _scalars(d: dict) -> list[dict]:
    return [{"setting": k, "value": v} for k, v in d.items() if isinstance(v, (str, int, float, bool)) and v != ""]


def _first_dict(d: dict, keys: tuple[str, ...]) -> dict:
    for k in keys:
        if isinstance(d.get(k), dict) and d[k]:
            return d[k]
    return {}


def card_facts(work: Work) -> dict:
    """What the model card reports, read from the results of notebooks 00-04 (whatever of them exists)."""
    env, data = _results(work, "00_environment"), _results(work, "01_data_generation")
    train, chat = _results(work, "02_qlora_finetune"), _results(work, "04_chat_demo")
    hyper = _first_dict(train, ("hyperparameters", "hyper_parameters", "training_config", "config", "settings"))
    data_rows = [{"fact": k, "value": data[k]} for k in ("records", "identity_records", "general_records", "answer",
                                                          "questions", "system", "output_format") if k in data]
    quantization = train.get("quantization")  # what the run used ("auto" in the hyper-parameters is the request)
    if hyper and quantization:
        hyper = {**hyper, "quantization": quantization}
    return {
        "name": data.get("name"), "answer": data.get("answer"), "base_model": env.get("base_model"),
        "quantization": quantization, "qlora": bool(quantization and "4" in str(quantization)),
        "evaluation_inputs": data.get("evaluation_inputs") or [],
        "data_rows": data_rows,
        "hyper_rows": _scalars(hyper) if hyper else _scalars({k: v for k, v in train.items() if "loss" not in k}),
        "loss_rows": [{"metric": k, "value": v} for k, v in train.items() if "loss" in k and isinstance(v, (int, float))],
        "eval_rows": _eval_rows(train),
        "before_after_rows": table_rows(chat, ("before_after", "table", "rows", "comparison")),
        "has_loss_plot": work.loss_plot.exists(),
        "cost_rows": _cost_rows(work),
    }


def _cost_rows(work: Work) -> list[dict]:
    """What the fine-tune cost: the table helpers.evaluate saved (base, base + adapter, final_model, the delta)."""
    return table_rows(_results(work, "evaluation"), ("table",))


def _eval_rows(train: dict) -> list[dict]:
    """The evaluation questions with the answers before and after training (notebook 02's results)."""
    questions = train.get("evaluation_inputs") or []
    before, after = train.get("answers_before") or [], train.get("answers_after") or []
    if questions and (before or after):
        return [{"question": q, "before": before[i] if i < len(before) else "",
                 "after": after[i] if i < len(after) else ""} for i, q in enumerate(questions)]
    return table_rows(train, ("eval_answers", "evaluation", "answers"))


def _base_model_id(recorded: str | None) -> str | None:
    """A hub-style id for the card's base_model field: an 'owner/name' as is, else the folder's name."""
    if not recorded:
        return None
    if recorded.count("/") == 1 and not recorded.startswith(("/", ".", "~")):
        return recorded
    name = Path(recorded).name
    return "course-kit/tiny-chat" if name == "model" else name


def model_card(work: Work, model_name: str, license: str = "apache-2.0", base_model: str | None = None,
               repo_url: str | None = None, language: tuple[str, ...] = ("zh", "en"), extra_tags=()) -> str:
    """README.md for the model repository: YAML metadata plus what it is, how it was trained, how to use it."""
    from huggingface_hub import ModelCard, ModelCardData

    facts = card_facts(work)
    base_model = base_model or _base_model_id(facts["base_model"])
    data = ModelCardData(license=license, base_model=base_model,
                         library_name="transformers", pipeline_tag="text-generation", language=list(language),
                         tags=[*(["qlora"] if facts["qlora"] else []), "lora", "peft", "self-cognition", "chat",
                               *extra_tags], model_name=model_name)
    tables = {k: markdown_table(facts[k]) for k in ("data_rows", "hyper_rows", "loss_rows", "eval_rows",
                                                    "before_after_rows", "cost_rows")}
    card = ModelCard.from_template(data, template_path=str(TEMPLATES / "model_card.md"), model_name=model_name,
                                   base_model=base_model, facts=facts, tables=tables, repo_url=_safe_url(repo_url) if repo_url else None)
    return re.sub(r"\n{3,}", "\n\n", str(card))


def card_for_display(repo_dir: str | os.PathLike):
    """The model card as a notebook shows it: the YAML header as a small table, the Markdown below it, and
    pictures embedded (a notebook resolves `loss.png` against its own folder, not the repository's)."""
    import base64

    from huggingface_hub import ModelCard
    from IPython.display import Markdown

    repo_dir = Path(repo_dir)
    card = ModelCard.load(repo_dir / "README.md")

    def embed(m: re.Match) -> str:
        picture = repo_dir / m.group(2)
        if not picture.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(picture.read_bytes()).decode()})"

    meta = markdown_table([{"metadata": k, "value": v} for k, v in card.data.to_dict().items()])
    text = re.sub(r"!\[([^]]*)\]\(([^):]+\.png)\)", embed, card.text)
    return Markdown(f"{meta}\n\n{text}")
