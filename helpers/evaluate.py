"""What the fine-tune cost, as numbers: the base model, base + adapter and final_model side by side on general
ability (multiple choice through lm-eval), the loss on held-out general chat, and the identity on held-out
paraphrases (`python -m helpers evaluate WORK`)."""
from __future__ import annotations

import sys
from pathlib import Path

from .paths import DATA_DIR, Work

COURSE_TASK = "course_mc"  # the kit's own bilingual multiple-choice set, an lm-eval task that runs offline
COURSE_TASK_FILE = DATA_DIR / "course_mc" / "course_mc.yaml"
RESULTS_NAME = "evaluation"  # WORK/results/evaluation.json
MODELS = ("base", "base + adapter", "final_model")
COLUMNS = ("measure", *MODELS, "delta")
IDENTITY_QUESTIONS_MAX_NEW_TOKENS = 48  # enough for the identity sentence; the share only looks for the name


class EvaluationError(ValueError):
    """The evaluation cannot run as asked; the message says why and what to do, in one sentence."""


def course_task() -> dict:
    """The kit's task as lm-eval reads it, its data file named by absolute path (the YAML names it from the kit's
    folder, where `lm_eval --include_path data/course_mc` runs)."""
    import yaml

    config = yaml.safe_load(COURSE_TASK_FILE.read_text(encoding="utf-8"))
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(DATA_DIR.parent / path) for split, path in files.items()}
    return config


def _task_specs(tasks: list[str]):
    """(lm-eval task specs, its TaskManager): the kit's task as its config, any other name (cmmlu_anatomy,
    ceval-valid_law, mmlu_...) as lm-eval's own, refused in one sentence when lm-eval has no such task."""
    from lm_eval.tasks import TaskManager

    others = [name for name in tasks if name != COURSE_TASK]
    manager = TaskManager(include_defaults=bool(others))  # indexing lm-eval's thousands of tasks takes seconds
    specs = []
    for name in tasks:
        if name == COURSE_TASK:
            specs.append(course_task())
            continue
        if name not in manager.all_tasks:
            raise EvaluationError(f"tasks: {name!r} is not an lm-eval task; give {COURSE_TASK!r} or a benchmark subset "
                                  "lm-eval knows, e.g. 'cmmlu_anatomy', 'ceval-valid_computer_network', "
                                  "'mmlu_high_school_geography' (`lm_eval ls tasks` lists them).")
        specs.append(name)
    return specs, manager


def multiple_choice(model_dir, adapter=None, tasks=(COURSE_TASK,), limit: int | None = None, system: str = "",
                    batch_size: int = 8, model=None, tokenizer=None) -> dict[str, float]:
    """Accuracy per task through lm-eval's Python API: the `hf` backend on `model_dir`, with the PEFT adapter on
    top when one is given (or on `model` and `tokenizer`, already loaded), answers in the model's chat template
    (with the trained system prompt)."""
    import contextlib
    import io
    import logging

    import torch
    from lm_eval import simple_evaluate

    from .merge import _has_tokenizer

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-request warnings a student cannot act on
    model_args = {"pretrained": str(model_dir), "dtype": "auto",
                  "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if adapter is not None:
        model_args["peft"] = str(adapter)
        if _has_tokenizer(Path(adapter)):  # the tokenizer training saved (its chat template), as chat loads it
            model_args["tokenizer"] = str(adapter)
    specs, manager = _task_specs(list(tasks))
    backend = {"model": "hf", "model_args": model_args}
    if model is not None:
        from lm_eval.models.huggingface import HFLM

        backend = {"model": HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)}
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's per-stage progress bars; errors still raise
            out = simple_evaluate(**backend, tasks=specs, task_manager=manager, limit=limit,
                                  batch_size=batch_size, apply_chat_template=True,
                                  system_instruction=system or None, log_samples=False, verbosity="ERROR")
    except (ConnectionError, OSError) as e:
        if "offline" in str(e).lower() or "connect" in str(e).lower() or "resolve" in str(e).lower():
            raise EvaluationError(f"tasks {', '.join(t for t in tasks if t != COURSE_TASK)}: the benchmark's data "
                                  "could not be downloaded (no network, or HF_HUB_OFFLINE is set); evaluate on "
                                  f"{COURSE_TASK!r} alone, or on a machine that reaches the hub.") from None
        raise
    scores = {}
    for name in tasks:
        found = out["results"].get(name) or (out.get("groups") or {}).get(name) or {}
        scores[name] = float(found["acc,none"])
    return scores


def heldout_chat_loss(model, tokenizer, system: str = "") -> float:
    """Mean loss per answer token on held-out general chat (data/general_heldout.json, in no training data),
    masked as training masks it: only the answer and its stop token count."""
    import torch

    from .data import encode_messages, heldout_general_samples
    from .generation import build_messages

    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for pair in heldout_general_samples():
            messages = build_messages(pair["input"], system) + [{"role": "assistant", "content": pair["output"]}]
            enc = encode_messages(tokenizer, messages)
            ids = torch.tensor([enc["input_ids"]], device=device)
            labels = torch.tensor([enc["labels"]], device=device)
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            tokens += n
    return total / tokens


def identity_share(answers: list[str], name: str) -> float:
    """The share of answers that give the name (the grader's test for 'answered with the identity')."""
    return sum(name in a for a in answers) / len(answers) if answers else 0.0


def measure(models, label: str, *, name: str, identity: str, system: str, tasks, limit) -> dict:
    """One model's row (`label`: "base", "adapter" or "final_model" of `models`, loaded once): multiple-choice
    accuracy per task, held-out chat loss, and the identity on held-out paraphrases (and, for 'it answers
    everything with its identity', on held-out general questions)."""
    from .chat import general_questions, leaks_identity
    from .generation import generate_answers
    from .homework import PARAPHRASES

    with models.use(label) as (model, tokenizer):
        row = {f"accuracy: {task}": acc for task, acc in
               multiple_choice(None, tasks=tasks, limit=limit, system=system, model=model, tokenizer=tokenizer).items()}
        row["held-out chat loss"] = heldout_chat_loss(model, tokenizer, system)
        asked = generate_answers(model, tokenizer, PARAPHRASES, system=system,
                                 max_new_tokens=IDENTITY_QUESTIONS_MAX_NEW_TOKENS, label="evaluation")
        general = generate_answers(model, tokenizer, [g["input"] for g in general_questions()], system=system,
                                   max_new_tokens=IDENTITY_QUESTIONS_MAX_NEW_TOKENS, label="evaluation")
    row["identity on held-out paraphrases"] = identity_share(asked, name)
    row["identity leaks into general questions"] = sum(leaks_identity(a, identity) for a in general) / len(general)
    return row


def fine_tune_cost(work: Work, tasks=(COURSE_TASK,), limit: int | None = None, allow_unverified: bool = False,
                   save: bool = True, models=None) -> dict:
    """Base, base + adapter and final_model measured the same way (see `measure`); saved as
    WORK/results/evaluation.json for the report and the model card. `tasks`: the kit's task and/or lm-eval
    benchmark subsets (those need the network once); `limit`: questions per task (None: all); `models`: the
    notebook's models already loaded (chat.load_course_models with WORK/adapter named "adapter"), else loaded here."""
    from tqdm.auto import tqdm

    from .base_model import base_model_path
    from .chat_defaults import trained_system_prompt
    from .fingerprint import current_sources
    from .merge import require_verified
    from .results import read_results, save_results

    data = read_results(work, "01_data_generation")
    if not data or "name" not in data:
        raise EvaluationError(f"{work.result('01_data_generation')}: missing; run notebooks 00-03 with this work_dir "
                              "first (the evaluation needs the name, the base, the adapter and final_model).")
    for folder, notebook in ((work.adapter, "02"), (work.final_model, "03")):
        if not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
            raise EvaluationError(f"{folder}: missing; run notebook {notebook} with this work_dir first.")
    tasks = list(tasks) or [COURSE_TASK]
    _task_specs(tasks)  # an unknown task is refused before any model loads
    warning = require_verified(work.final_model, allow_unverified, adapter=work.adapter)
    base = base_model_path(work)
    system = trained_system_prompt(work.final_model, work.adapter) or ""  # as training asked, like `helpers chat`
    if models is None:
        from .chat import load_course_models

        models = load_course_models(base, work.final_model, {"adapter": work.adapter})
    rows = {}
    for label, which in tqdm(list(zip(MODELS, ("base", "adapter", "final_model"))), desc="evaluating", file=sys.stdout):
        rows[label] = measure(models, which, name=data["name"], identity=data["answer"], system=system,
                              tasks=tasks, limit=limit)
    result = {"models": rows, "tasks": tasks, "limit": limit, "system": system, "name": data["name"],
              "unverified": warning, "sources": current_sources(work, ("adapter", "final_model"))}
    result["table"] = [dict(zip(COLUMNS, row)) for row in cost_rows(result)]  # as the report and model card show it
    if save:
        save_results(work, RESULTS_NAME, result)
    return result


def cost_table(result: dict):
    """One small table: a row per measure, a column per model, and the fine-tune's delta (final_model - base)."""
    import pandas as pd

    table = pd.DataFrame(result["models"])[list(MODELS)]
    table["delta"] = table["final_model"] - table["base"]
    return table.round(3)


def cost_rows(result: dict) -> list[list[str]]:
    """The table as text rows (measure, base, base + adapter, final_model, delta) for the report and model card."""
    table = cost_table(result)
    return [[measure] + [f"{v:+.3f}" if col == "delta" else f"{v:.3f}" for col, v in row.items()]
            for measure, row in table.iterrows()]


def add_command(sub) -> None:
    p = sub.add_parser("evaluate", help="what the fine-tune cost: base, base + adapter and final_model side by side")
    p.add_argument("work_dir", nargs="?", default=None, help="the run's work directory (default: ./work)")
    p.add_argument("--tasks", nargs="+", default=[COURSE_TASK],
                   help=f"lm-eval tasks: {COURSE_TASK} (offline, the default) and/or benchmark subsets such as "
                        "cmmlu_anatomy, ceval-valid_computer_network, mmlu_high_school_geography (need the network once)")
    p.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    p.add_argument("--unverified", action="store_true",
                   help="evaluate a final_model whose merge check is missing or out of date (said in the results)")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    from .base_model import ModelPathError
    from .merge import AdapterError, UnverifiedModelError
    from .paths import work
    from .progress import quiet_libraries

    quiet_libraries()
    w = work(args.work_dir, create=False)
    try:
        result = fine_tune_cost(w, args.tasks, args.limit, args.unverified)
    except (EvaluationError, ModelPathError, AdapterError, UnverifiedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["unverified"]:
        print(result["unverified"])
    print(cost_table(result).to_string())
    print(f"saved: {w.result(RESULTS_NAME)}")
    return 0
