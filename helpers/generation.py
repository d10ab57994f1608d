"""Answering questions with a chat model: greedy, with the model's own chat template and stop tokens."""
from __future__ import annotations

from .template import stop_token_ids


def build_messages(question: str, system: str = "", history: list[dict] | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + list(history or []) + [{"role": "user", "content": question}]


def context_length(model, default: int = 2048) -> int:
    """How many positions the model attends over (its config's max_position_embeddings)."""
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or default)


def fit_history(tokenizer, question: str, system: str, history: list[dict], context: int,
                reserve: int) -> tuple[list[dict], int]:
    """The messages for the next reply with the newest whole turns of `history` that leave `reserve` positions
    for the answer within `context`; returns (messages, how many older turns were dropped)."""
    turns = [history[i:i + 2] for i in range(0, len(history), 2)]
    for dropped in range(len(turns) + 1):
        messages = build_messages(question, system, [m for turn in turns[dropped:] for m in turn])
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        if len(ids) + reserve <= context:
            return messages, dropped
    return messages, len(turns)  # the question alone is too long: it goes as it is, and the answer is cut short


def generate_answers(model, tokenizer, questions: list[str], system: str = "", max_new_tokens: int = 64,
                     **generate_kwargs) -> list[str]:
    """Greedy answers, one per question (one at a time: no padding effects, identical to chatting)."""
    import torch

    stop = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    was_training = model.training
    model.eval()
    answers = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for q in questions:
            enc = tokenizer.apply_chat_template(build_messages(q, system), add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
            answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return answers
