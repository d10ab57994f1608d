"""What a student sees while training runs: the evaluation rounds (the identity arriving), metrics.jsonl with the
live loss curve, and one progress bar."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from ..data import atomic_write_text
from ..progress import headless
from ..progress import tqdm as progress_bar
from .config import TrainConfig
from .packed import generation_mode
from .results import append_line, loss_plot_png, peak_memory_mb, read_jsonl

DRAW_SHARE = 0.03  # the live loss plot's redraws (~0.2 s each for a 1.8B run's host) take at most this share of time


class EvaluationCallback(TrainerCallback):
    """Answers evaluation_inputs before training, every evaluation_freq updates and at the end."""

    def __init__(self, tokenizer, config: TrainConfig, out_dir: Path):
        self.tokenizer, self.config, self.out_dir = tokenizer, config, out_dir
        self.done: set[int] = set()

    def evaluate(self, model, step: int) -> None:
        from ..distributed import full_weights, is_main
        from ..generation import generate_answers

        if step in self.done:
            return
        with full_weights(model) as whole, generation_mode(whole, getattr(whole, "plan", None)):  # every rank answers, the main one writes
            answers = generate_answers(whole, self.tokenizer, self.config.evaluation_inputs,
                                       system=self.config.system, max_new_tokens=self.config.max_new_tokens,
                                       use_cache=True)
        if not is_main():
            self.done.add(step)
            return
        record = {"step": step, "inputs": self.config.evaluation_inputs, "answers": answers}
        atomic_write_text(self.out_dir / f"step_{step:06d}.json", json.dumps(record, ensure_ascii=False, indent=1))
        self.done.add(step)
        if not headless() or step == 0:
            for q, a in zip(self.config.evaluation_inputs, answers):
                print(f"[step {step}] {q} -> {a}")

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step == 0 or not (self.out_dir / f"step_{state.global_step:06d}.json").exists():
            self.evaluate(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.config.evaluation_freq == 0:
            self.evaluate(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kw):
        self.evaluate(model, state.global_step)

class MetricsCallback(TrainerCallback):
    """metrics.jsonl (step, loss, lr, grad_norm, tokens/s, peak memory) and the live loss curve."""

    def __init__(self, trainer_ref, metrics_path: Path, plot_path: Path, title: str):
        self.trainer_ref, self.metrics_path, self.plot_path, self.title = trainer_ref, metrics_path, plot_path, title
        self.rows: list[dict] = []
        self.handle = None
        self.last_draw, self.draw_cost = 0.0, 0.0
        self.last_time, self.last_tokens = None, 0

    def on_train_begin(self, args, state, control, **kw):
        # A resumed run keeps the rows up to its checkpoint and drops the ones it will redo.
        if self.metrics_path.exists():
            self.rows = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= state.global_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.last_time, self.last_tokens = time.perf_counter(), self.trainer_ref().tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), self.trainer_ref().tokens_seen
        row = {"step": state.global_step, "loss": round(float(logs["loss"]), 6),
               "lr": float(logs.get("learning_rate", 0.0)),
               "grad_norm": None if logs.get("grad_norm") is None else round(float(logs["grad_norm"]), 6),
               "tokens_per_s": round((tokens - self.last_tokens) / max(now - self.last_time, 1e-9), 1),
               "peak_memory_mb": round(peak_memory_mb(), 1), "epoch": round(float(logs.get("epoch", 0)), 4),
               "time": round(time.time(), 2)}
        self.last_time, self.last_tokens = now, tokens
        self.rows.append(row)
        append_line(self.metrics_path, json.dumps(row))
        if not headless() and time.perf_counter() - self.last_draw > max(2.0, self.draw_cost / DRAW_SHARE):
            self.draw()

    def on_train_end(self, args, state, control, **kw):
        self.draw(final=True)

    def draw(self, final: bool = False) -> None:
        start = time.perf_counter()
        png = loss_plot_png(self.rows, self.title)
        if png is None:
            return
        self.draw_cost = time.perf_counter() - start  # the next redraw waits so that drawing stays a small share
        if final:
            self.plot_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.plot_path.with_suffix(".tmp.png")
            tmp.write_bytes(png)
            os.replace(tmp, self.plot_path)
        self.last_draw = time.perf_counter()
        try:
            from IPython import get_ipython
            from IPython.display import Image, display
        except ImportError:
            return
        if get_ipython() is None:
            return
        if self.handle is None:
            self.handle = display(Image(data=png), display_id=True)
        else:
            self.handle.update(Image(data=png))

class ProgressCallback(TrainerCallback):
    """One tqdm bar over the updates (widget interactively, a few plain lines headless)."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kw):
        self.bar = progress_bar(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

    def on_step_end(self, args, state, control, **kw):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    def on_train_end(self, args, state, control, **kw):
        self.bar.close()
