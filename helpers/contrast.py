"""The seed's over-fitting lesson, on purpose: an adapter trained on the identity alone (no general chat,
many repeats), so the over-fitting check can be seen to fail next to the mixed run that passes it."""
from __future__ import annotations

from .paths import Work


def overfitted_run(work: Work, name: str, answer_template: str, questions: list[str], system: str = "",
                   repeats: int = 10000, max_steps: int | None = None, preset: str = "tiny", seed: int = 0) -> dict:
    """Make identity-only data (general_ratio=0) and train an adapter on it, all inside WORK/contrast.

    The same train() as notebook 02; returns its summary (the adapter is in WORK/contrast/adapter)."""
    from .base_model import base_model_path
    from .data import make_dataset
    from .train import TrainConfig, train

    contrast = Work(work.contrast)
    make_dataset(contrast.dataset, name=name, answer_template=answer_template, repeats=repeats,
                 questions=questions, system=system, general_ratio=0.0)
    config = TrainConfig(preset=preset, base_model=str(base_model_path(work)), max_steps=max_steps,
                         evaluation_inputs=questions[:1], system=system, seed=seed)
    result = train(config, contrast)
    result.pop("model", None)
    return result
