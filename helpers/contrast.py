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
    with _live_plot_hidden():  # its live plot carries the main run's title: loss_comparison shows it, named
        result = train(config, contrast)
    result.pop("model", None)
    return result


def _live_plot_hidden():
    """Keep the training's live loss plot out of the notebook (the progress bar and printed lines still show)."""
    from contextlib import nullcontext

    try:
        from IPython.utils.capture import capture_output
    except ImportError:
        return nullcontext()
    return capture_output(stdout=False, stderr=False, display=True)


def loss_comparison_figure(work: Work):
    """The mixed run's loss (notebook 02) and the over-fitted contrast's, on one plot with its own title."""
    from matplotlib.figure import Figure

    from .plots import use_cjk_font
    from .train import read_metrics

    use_cjk_font()
    fig = Figure(figsize=(7, 3.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for label, rows in (("mixed run (notebook 02)", read_metrics(work)),
                        ("over-fitted contrast (identity only)", read_metrics(Work(work.contrast)))):
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
    ax.set(title="Loss: the mixed run and the over-fitted contrast", xlabel="step (optimizer update)", ylabel="loss",
           yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def loss_comparison(work: Work):
    """loss_comparison_figure saved as WORK/contrast/loss_comparison.png, returned as an image to show."""
    from IPython.display import Image

    path = work.contrast / "loss_comparison.png"
    loss_comparison_figure(work).savefig(path, format="png")
    return Image(filename=str(path))
