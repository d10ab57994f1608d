"""One chat: a model (full, or base + adapter), its reply streamed token by token, and the turns so far."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from ..generation import context_length, fit_history
from ..merge import load_model, load_tokenizer
from ..template import stop_token_ids


class ChatError(RuntimeError):
    """The model could not answer; the message says why in one sentence."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (the same answer every time)
    top_p: float = 1.0


def load_chat_model(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None):
    """(model, tokenizer) for chatting: a full model, or a base model with an adapter on top (the kit's, or XTuner's
    pth_to_hf folder or iter_N.pth, converted for this session as `xtuner chat BASE --adapter ADAPTER` takes it)."""
    from ..base_model import loadable_model_dir
    from ..xtuner import converted_adapter, xtuner_format

    model_dir = loadable_model_dir(model_dir)  # `chat work/model --adapter work/adapter` for a real base model too
    if adapter is not None and xtuner_format(adapter):
        with converted_adapter(adapter, model_dir) as kit:
            return load_model(model_dir, kit), load_tokenizer(model_dir, kit)
    return load_model(model_dir, adapter), load_tokenizer(model_dir, adapter)


def stream_reply(model, tokenizer, messages: list[dict], settings: GenerationSettings | None = None):
    """Yield the assistant's reply piece by piece as it is generated (TextIteratorStreamer + a thread)."""
    import torch
    from transformers import TextIteratorStreamer

    settings = settings or GenerationSettings()
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True).to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    sample = settings.temperature > 0
    kwargs = dict(**enc, streamer=streamer, max_new_tokens=int(settings.max_new_tokens), do_sample=sample,
                  eos_token_id=stop_token_ids(tokenizer, getattr(model, "generation_config", None)),
                  pad_token_id=tokenizer.pad_token_id)
    if sample:
        kwargs.update(temperature=float(settings.temperature), top_p=float(settings.top_p))
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    errors = []

    def work():
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except Exception as e:  # re-raised in the caller's thread after the streamer ends
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


@dataclass
class ChatSession:
    """A conversation: the system prompt, the turns so far, and the generation settings."""

    model: object
    tokenizer: object
    system: str = ""
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    history: list[dict] = field(default_factory=list)
    dropped: int = 0  # older turns left out of the last prompt, so that it fits the model's context

    def send(self, text: str):
        """Yield the reply's pieces; when it is complete, the turn joins the history. The prompt keeps the
        newest turns that fit the model's context with room for the answer (`dropped` says how many did not)."""
        pieces = []
        messages, self.dropped = fit_history(self.tokenizer, text, self.system, self.history,
                                             context_length(self.model), int(self.settings.max_new_tokens))
        for piece in stream_reply(self.model, self.tokenizer, messages, self.settings):
            pieces.append(piece)
            yield piece
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces).strip()}]

    def ask(self, text: str) -> str:
        return "".join(self.send(text)).strip()

    def reset(self) -> None:
        self.history, self.dropped = [], 0
