"""Training data: every record as tokens with its loss mask, packed into rows, and the collator that lays a
batch of rows out flat for the packed model (helpers.train.packed)."""
from __future__ import annotations

import json
import random

from ..data import IGNORE_INDEX, encode_messages, load_dataset
from .config import TrainConfig, TrainConfigError


def encode_dataset(tokenizer, data_path, max_length: int) -> list[dict]:
    """Every record as {input_ids, labels}, truncated to max_length; one sentence for data that cannot train."""
    conversations = load_dataset(data_path)
    encoded: dict[str, dict] = {}  # the course's data repeats a few conversations thousands of times: encode each once
    full = []
    for c in conversations:
        key = json.dumps(c, ensure_ascii=False, sort_keys=True)
        if key not in encoded:
            encoded[key] = encode_messages(tokenizer, c)
        full.append(encoded[key])
    lengths = [len(e["input_ids"]) for e in full]
    if min(lengths) > max_length:
        raise TrainConfigError(f"max_length={max_length} is shorter than every sample in {data_path} (the shortest "
                               f"is {min(lengths)} tokens); raise max_length to at least {min(lengths)}.")
    samples = []
    for i, e in enumerate(full):
        ids, labels = e["input_ids"][:max_length], e["labels"][:max_length]
        if all(lab == IGNORE_INDEX for lab in labels):
            raise TrainConfigError(
                f"{data_path}: record {i} has no assistant tokens left after truncation to max_length={max_length} "
                f"(it is {lengths[i]} tokens, the answer starts later); raise max_length or shorten that record.")
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def pack_samples(samples: list[dict], max_length: int, seed: int = 0) -> list[dict]:
    """Concatenate samples (in a seeded shuffled order) into rows of at most max_length tokens.

    position_ids restart at 0 for every sample: the attention mask is built from them, so no token sees
    another sample, and the first token of a sample is never a target of the one before.
    """
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    rows, row = [], {"input_ids": [], "labels": [], "position_ids": []}
    for i in order:
        s = samples[i]
        if row["input_ids"] and len(row["input_ids"]) + len(s["input_ids"]) > max_length:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] += s["input_ids"]
        row["labels"] += [IGNORE_INDEX] + s["labels"][1:]
        row["position_ids"] += list(range(len(s["input_ids"])))
    if row["input_ids"]:
        rows.append(row)
    return rows


def build_dataset(tokenizer, config: TrainConfig, data_path) -> tuple[list[dict], dict]:
    """The training rows and a summary (samples, rows, tokens, trained tokens)."""
    samples = encode_dataset(tokenizer, data_path, config.max_length)
    rows = pack_samples(samples, config.max_length, config.seed) if config.pack_to_max_length else samples
    tokens = sum(len(r["input_ids"]) for r in rows)
    trained = sum(sum(lab != IGNORE_INDEX for lab in r["labels"]) for r in rows)
    return rows, {"samples": len(samples), "rows": len(rows), "tokens": tokens, "trained_tokens": trained,
                  "packed": bool(config.pack_to_max_length)}


def packed_row_table(tokenizer, row: dict):
    """One training row, sample by sample: its positions, the text read, and the text trained on (the loss mask)."""
    import pandas as pd

    ids, labels = row["input_ids"], row["labels"]
    positions = row.get("position_ids") or list(range(len(ids)))
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
    out = []
    for a, b in zip(starts, starts[1:]):
        trained = [t for t, lab in zip(ids[a:b], labels[a:b]) if lab != IGNORE_INDEX]
        out.append({"positions": f"0..{b - a - 1}", "text": tokenizer.decode(ids[a:b]),
                    "trained on": tokenizer.decode(trained)})
    return pd.DataFrame(out)


class Collator:
    """A batch of rows -> one flat row of samples (the packed model's input) plus the rows' labels, which the
    Trainer counts for the token-averaged loss. Every sample keeps its positions and attends only to itself;
    an unpacked row is one sample. `pad_to` pads the flat row to a fixed number of tokens (blocks of at most
    `max_seq` that predict nothing), so compiled layers see one shape; the collator runs on the CPU, so the GPU
    never waits for these small index computations."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None, max_seq: int | None = None):
        self.pad, self.pad_to, self.max_seq = pad_token_id, pad_to, max_seq

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        from .packed import flat_batch

        width = max(len(r["input_ids"]) for r in rows)
        ids, labels, positions = [], [], []
        for r in rows:
            n = width - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad] * n)
            labels.append(r["labels"] + [IGNORE_INDEX] * n)
            own = r.get("position_ids") or list(range(len(r["input_ids"])))
            positions.append(own + list(range(n)))  # the padding is a block of its own that predicts nothing
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}
        return {"labels": batch["labels"], **flat_batch(batch, self.pad_to, self.max_seq)}
