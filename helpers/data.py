"""Self-cognition data: make it, validate it, and turn it into tokens with the loss mask."""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

from .fingerprint import file_sha256  # noqa: F401  (the data's hash: one implementation, in fingerprint)
from .paths import DATA_DIR
from .template import TemplateError, end_of_turn_token, to_messages

# Course defaults (facts of the course's homework).
DEFAULT_NAME = "小明"
DEFAULT_ANSWER = "我是{name}的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦"
COURSE_QUESTION = "请做一下自我介绍"
DEFAULT_QUESTIONS = [COURSE_QUESTION, "介绍一下你自己", "你是谁呀", "你叫什么名字", "你是我的助手吗", "Who are you?"]
DEFAULT_EVALUATION_INPUTS = ["请你介绍一下你自己", "你是谁", "你是我的小助手吗"]
GENERAL_CHAT_FILE = DATA_DIR / "general_chat.json"
HELDOUT_FILE = DATA_DIR / "general_heldout.json"  # general questions kept out of all training (the over-fitting check)
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad training data; the message names the file, record, field and the fix."""


# ---------------------------------------------------------------- validation
def _json_records_with_lines(text: str, path: Path) -> list[tuple[object, int]]:
    """Decode a JSON array element by element, keeping each element's line (json gives no such map)."""
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); fix the syntax there.") from None
        raise DataError(
            f"{path}: the top level is a {type(value).__name__}, not a list; wrap the records in [ ... ]."
        )
    i += 1
    records, line, counted = [], 1, 0  # newlines counted up to `counted`: each character is counted once
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise DataError(f"{path}: the list is not closed; add the final ']'.")
        if text[i] == "]":
            return records
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); fix the syntax there.") from None
        line += text.count("\n", counted, i)
        counted = i
        records.append((value, line))
        i = end


def _read_records(path: Path) -> list[tuple[object, int]]:
    if not path.exists():
        raise DataError(f"{path}: no such file; run notebook 01 (or give the right path).")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: the file is empty; write at least one record.")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((json.loads(line), n))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n}: not valid JSON ({e.msg}); each line must be one JSON object.") from None
        return records
    return _json_records_with_lines(text, path)


def _check_text(value, where: str, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise DataError(f"{where} is {type(value).__name__}, not a string; write the text in quotes.")
    if not allow_empty and not value.strip():
        raise DataError(f"{where} is empty; write the text there or drop the turn.")


def record_to_messages(record, where: str) -> list[dict]:
    """One record (XTuner 'conversation' or OpenAI 'messages') -> checked chat messages."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, not an object; each record is {{\"conversation\": [...]}}.")
    if "conversation" in record:
        turns = record["conversation"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: field 'conversation' must be a non-empty list of {{input, output}} turns.")
        for t, turn in enumerate(turns):
            field = f"{where}: field 'conversation[{t}]"
            if not isinstance(turn, dict):
                raise DataError(f"{field}' is not an object; write {{\"input\": ..., \"output\": ...}}.")
            for key in ("input", "output"):
                if key not in turn:
                    raise DataError(f"{field}' has no '{key}' key; every turn needs 'input' and 'output'.")
                _check_text(turn[key], f"{field}.{key}'")
            if "system" in turn:
                _check_text(turn["system"], f"{field}.system'", allow_empty=True)
            extra = set(turn) - {"system", "input", "output"}
            if extra:
                raise DataError(f"{field}' has unknown key(s) {sorted(extra)}; only system, input, output are read.")
        return to_messages(turns)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}.")
        for m, msg in enumerate(messages):
            field = f"{where}: field 'messages[{m}]"
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise DataError(f"{field}' needs both 'role' and 'content' keys.")
            if msg["role"] not in ROLES:
                raise DataError(f"{field}.role' is {msg['role']!r}; use one of {', '.join(ROLES)}.")
            _check_text(msg["content"], f"{field}.content'", allow_empty=msg["role"] == "system")
        if not any(msg["role"] == "assistant" for msg in messages):
            raise DataError(f"{where}: field 'messages' has no assistant turn; add the answer to train on.")
        # The chat template renders what comes before each answer as its prompt: that needs a user turn first,
        # and user and assistant taking turns (system messages may come before any user turn).
        previous = None
        for m, msg in enumerate(messages):
            if msg["role"] == "system":
                continue
            if previous is None and msg["role"] == "assistant":
                raise DataError(f"{where}: field 'messages[{m}]' is the assistant's, but no user message comes before "
                                "it; start the conversation with the user's question.")
            if msg["role"] == previous:
                raise DataError(f"{where}: field 'messages[{m}]' is a second {previous} message in a row; user and "
                                f"assistant must take turns, so merge the two or add the missing turn between them.")
            previous = msg["role"]
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    raise DataError(
        f"{where} has keys {sorted(record)} but needs 'conversation' (XTuner) or 'messages' (OpenAI); rename the key."
    )


def load_dataset(path: str | os.PathLike) -> list[list[dict]]:
    """Read and validate a dataset file; returns one message list per record."""
    path = Path(path)
    records = _read_records(path)
    if not records:
        raise DataError(f"{path}: the dataset has no records; write at least one.")
    return [record_to_messages(rec, f"{path}: record {i} (line {line})") for i, (rec, line) in enumerate(records)]


def validate_data(path: str | os.PathLike) -> dict:
    """Validate a dataset file and return a short summary (raises DataError with one sentence)."""
    conversations = load_dataset(path)
    fmt = "conversation"
    first = _read_records(Path(path))[0][0]
    if isinstance(first, dict) and "messages" in first:
        fmt = "messages"
    return {"file": str(path), "format": fmt, "records": len(conversations),
            "turns": sum(sum(m["role"] == "assistant" for m in c) for c in conversations)}


# ---------------------------------------------------------------- making data
def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def general_chat_samples() -> list[dict]:
    """The kit's small bilingual general-chat set (XTuner format), shipped in data/."""
    return json.loads(GENERAL_CHAT_FILE.read_text(encoding="utf-8"))


def heldout_general_samples() -> list[dict]:
    """General questions with reference answers that no training data holds ({"input", "output"} pairs)."""
    return json.loads(HELDOUT_FILE.read_text(encoding="utf-8"))


def make_dataset(
    path: str | os.PathLike,
    name: str = DEFAULT_NAME,
    answer_template: str = DEFAULT_ANSWER,
    repeats: int = 10000,
    questions: list[str] | None = None,
    system: str = "",
    general_ratio: float = 0.0,
    output_format: str = "conversation",
    seed: int = 0,
) -> Path:
    """Write the self-cognition dataset: each question -> the identity answer, `repeats` records in all.

    general_ratio: share of general-chat samples mixed in (0.2 = one in five), against over-fitting.
    """
    from .parameters import check_value

    for label, value, kind in (("name", name, str), ("answer_template", answer_template, str), ("system", system, str)):
        check_value(label, value, kind, error=DataError)
    repeats = check_value("repeats", repeats, int, minimum=1, error=DataError)
    questions = check_value("questions", questions, list, items=str, optional=True, error=DataError)
    general_ratio = check_value("general_ratio", general_ratio, float, error=DataError)
    seed = check_value("seed", seed, int, error=DataError)
    if "{name}" not in answer_template:
        raise DataError("answer_template has no '{name}' placeholder; write e.g. '我是{name}的小助手'.")
    if not isinstance(name, str) or not name.strip():
        raise DataError("name is empty; set name to whose assistant this is, e.g. name = '小明'.")
    if output_format not in ("conversation", "messages"):
        raise DataError(f"output_format is {output_format!r}; use 'conversation' (XTuner) or 'messages' (OpenAI).")
    if not 0 <= general_ratio < 1:
        raise DataError(f"general_ratio is {general_ratio}; use a share between 0 and 1 (e.g. 0.2).")
    questions = list(questions or [COURSE_QUESTION])
    answer = answer_template.format(name=name)
    turns = [{"system": system, "input": questions[i % len(questions)], "output": answer} for i in range(repeats)]
    if general_ratio > 0:
        general = [rec["conversation"][0] | {"system": system} for rec in general_chat_samples()]
        n_general = round(repeats * general_ratio / (1 - general_ratio))
        turns += [general[i % len(general)] for i in range(n_general)]
        random.Random(seed).shuffle(turns)
    if output_format == "conversation":
        records = [{"conversation": [t]} for t in turns]
    else:
        records = [{"messages": to_messages([t])} for t in turns]
    path = Path(path)
    atomic_write_text(path, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    return path


# ---------------------------------------------------------------- tokens and the loss mask
IGNORE_INDEX = -100


def encode_messages(tokenizer, messages: list[dict], max_length: int | None = None) -> dict:
    """Token ids and labels for one conversation: labels keep only assistant answers and their stop token.

    The pieces come from the tokenizer's own chat template, so training sees exactly the inference layout.
    """
    eot = end_of_turn_token(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise TemplateError(
                f"The chat template of {tokenizer.name_or_path} renders earlier turns differently when later ones "
                "are added, so the loss mask cannot be placed; use the model's own chat template."
            )
        answer = full[len(prompt):]
        head, sep, tail = answer.partition(eot)
        prompt_ids = tokenizer(prompt[len(rendered):], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(head + sep, add_special_tokens=False)["input_ids"]
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        input_ids += prompt_ids + answer_ids + tail_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [IGNORE_INDEX] * len(tail_ids)
        rendered = full
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


class LossMaskView:
    """A sample as text, the trained-on spans coloured (HTML in a notebook; in plain text they sit in ⟦ ⟧)."""

    def __init__(self, spans: list[tuple[str, bool]]):
        self.spans = spans  # (text, trained) runs, each decoded as a whole so characters stay whole

    def _repr_html_(self) -> str:
        import html

        def piece(text: str, trained: bool) -> str:
            body = html.escape(text).replace("\n", "<span style='color:#999'>↵</span><br>")
            style = "background:#c8f7c5;color:#064" if trained else "background:#eee;color:#555"
            return f"<span style='{style};padding:1px 0'>{body}</span>"

        legend = ("<div style='font-size:smaller;margin-bottom:4px'><span style='background:#c8f7c5'>trained on"
                  "</span> &nbsp; <span style='background:#eee'>context only (masked out)</span></div>")
        return legend + "<div style='font-family:monospace;line-height:1.8'>" + \
            "".join(piece(t, m) for t, m in self.spans) + "</div>"

    def __repr__(self) -> str:
        return "".join(f"⟦{t}⟧" if m else t for t, m in self.spans)


def loss_mask_view(tokenizer, input_ids: list[int], labels: list[int], collapse_id: int | None = None) -> LossMaskView:
    """Runs of tokens with the same loss mask, decoded together (special tokens shown); a run of
    `collapse_id` tokens (the image positions) is shown once with its count."""
    spans, run, trained = [], [], None

    def flush():
        if run:
            spans.append((tokenizer.decode(run, skip_special_tokens=False), trained))

    for t, lab in zip(input_ids, labels):
        is_trained = lab != IGNORE_INDEX
        if collapse_id is not None and t == collapse_id:
            if spans and spans[-1][0].startswith("<image>×") and not run:
                n = int(spans[-1][0].split("×")[1]) + 1
                spans[-1] = (f"<image>×{n}", is_trained)
                continue
            flush()
            run, trained = [], is_trained
            spans.append(("<image>×1", is_trained))
            continue
        if is_trained != trained and run:
            flush()
            run = []
        run.append(t)
        trained = is_trained
    flush()
    return LossMaskView(spans)


def show_loss_mask(tokenizer, messages: list[dict], max_length: int | None = None) -> LossMaskView:
    """One sample as the model reads it, with the trained-on text (the loss mask) coloured."""
    enc = encode_messages(tokenizer, messages, max_length)
    return loss_mask_view(tokenizer, enc["input_ids"], enc["labels"])


def trained_text(tokenizer, messages: list[dict]) -> str:
    """Only the text the loss is computed on, decoded (what the model learns to say)."""
    enc = encode_messages(tokenizer, messages)
    return tokenizer.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])


def token_length_stats(tokenizer, conversations: list[list[dict]], sample: int = 2000):
    """Token lengths (chat template applied) of up to `sample` records, as a pandas describe()."""
    import pandas as pd

    picked = conversations[:sample]
    lengths = [len(encode_messages(tokenizer, c)["input_ids"]) for c in picked]
    return pd.Series(lengths, name="tokens").describe()
