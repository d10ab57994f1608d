"""Chatting with the LLaVA model about one picture: in the notebook and in the terminal
(`python -m helpers chat MODEL_DIR --image FILE`). The picture goes with the first question; later
questions continue the same conversation."""
from __future__ import annotations

import os
import sys

from .base_model import ModelPathError
from .template import TemplateError, stop_token_ids
from .terminal import run_cli as chat_loop  # the one terminal loop, shared with the text chat
from .vlm import VlmError, image_prompt, load_vlm, open_image
from .vlm_data import IMAGE_TOKEN



class VlmChat:
    """A conversation about one picture: greedy answers, streamed when `out` is given."""

    def __init__(self, model, processor, image, system: str = "", max_new_tokens: int = 128):
        self.model, self.processor, self.system, self.max_new_tokens = model, processor, system, max_new_tokens
        self.image = open_image(image) if isinstance(image, (str, os.PathLike)) else image
        self.stop = stop_token_ids(processor.tokenizer, model.generation_config)
        self.history: list[dict] = []

    def ask(self, question: str, out=None) -> str:
        import torch
        from transformers import TextStreamer

        tokenizer = self.processor.tokenizer
        text = image_prompt(self.processor, question, self.system, self.history, with_image=not self.history)
        enc = self.processor(images=self.image, text=text, return_tensors="pt", add_special_tokens=False)
        enc = enc.to(next(self.model.parameters()).device)
        enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        streamer = None
        if out is not None:
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            streamer.on_finalized_text = lambda piece, stream_end=False: print(piece, end="", file=out, flush=True)
        with torch.no_grad():
            ids = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      eos_token_id=self.stop, pad_token_id=tokenizer.pad_token_id, streamer=streamer)
        answer = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        first = not self.history
        self.history += [{"role": "user", "content": (f"{IMAGE_TOKEN}\n" if first else "") + question},
                         {"role": "assistant", "content": answer}]
        return answer

    def send(self, question: str):
        """Yield the answer's pieces as they are generated (what the terminal chat streams)."""
        import queue
        import threading

        pieces: queue.Queue = queue.Queue()
        outcome: dict = {}

        class _Pieces:  # a file-like sink that hands each printed piece to the caller's thread
            def write(self, text):
                if text:
                    pieces.put(text)

            def flush(self):
                pass

        def work():
            try:
                self.ask(question, out=_Pieces())
            except Exception as e:  # re-raised in the caller's thread
                outcome["error"] = e
            finally:
                pieces.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while (piece := pieces.get()) is not None:
            yield piece
        thread.join()
        if "error" in outcome:
            raise outcome["error"]

    def reset(self) -> None:
        self.history = []


def run_cli(model_dir, image, system: str = "", stdin=None, stdout=None, max_new_tokens: int = 128) -> int:
    """Terminal chat about `image`: read a line, stream the answer; RESET starts over, EXIT (or end of input) quits."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    try:
        image = open_image(image)
        model, processor = load_vlm(model_dir)
        chat = VlmChat(model, processor, image, system or "", max_new_tokens)
    except (VlmError, ModelPathError, TemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return chat_loop(chat, stdin, stdout, about=" about the picture")
