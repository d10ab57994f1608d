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


BATCH_SIZE = 32  # questions answered together; the course's lists (3 to 13 questions) go in one batch
TIMINGS: dict[str, float] = {}  # seconds spent answering, per caller's label (the GPU benchmark reads them)


def generation_cache(model) -> dict:
    """A static KV cache on a GPU where the model supports one (preallocated once per batch, no growing tensors);
    uncompiled, as a notebook's few batches would not win back a compile. The CPU keeps the dynamic cache."""
    device = next(model.parameters()).device
    if device.type == "cuda" and getattr(model, "_can_compile_fullgraph", False):
        return {"cache_implementation": "static", "disable_compile": True}
    return {}


def greedy_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop: list[int],
                 **generate_kwargs) -> list[list[int]]:
    """Greedy continuations of token-id prompts generated together: left padding with an attention mask, so every
    row keeps its own positions (transformers counts them from the mask); each ends before its first stop id."""
    import torch

    device = next(model.parameters()).device
    enc = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                         top_k=None, eos_token_id=stop, pad_token_id=pad, **generate_kwargs)
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:end])
    return rows


def generate_answers(model, tokenizer, questions: list[str], system: str = "", max_new_tokens: int = 64,
                     batch_size: int = BATCH_SIZE, label: str = "answers", **generate_kwargs) -> list[str]:
    """Greedy answers, one per question, generated `batch_size` at a time (batch_size=1: one by one, as a chat
    answers). In float32 each answer is token for token the one-at-a-time answer; at bf16 on a GPU a padded row's
    sums may round differently and, rarely, turn a near tie the other way."""
    import time

    import torch

    if not questions:
        return []
    start = time.perf_counter()
    stop = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    prompts = [tokenizer.apply_chat_template(build_messages(q, system), add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths together: less padding
    answers: list[str] = [""] * len(prompts)
    generate_kwargs = generation_cache(model) | generate_kwargs
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for first in range(0, len(order), max(1, batch_size)):
            batch = order[first:first + max(1, batch_size)]
            rows = greedy_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, stop, **generate_kwargs)
            for i, ids in zip(batch, rows):
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    if was_training:
        model.train()
    TIMINGS[label] = TIMINGS.get(label, 0.0) + time.perf_counter() - start
    return answers
