"""Progress bars: widgets in JupyterLab, short plain-text lines in headless runs (KIT_HEADLESS=1)."""
from __future__ import annotations

import os


def headless() -> bool:
    return os.environ.get("KIT_HEADLESS") == "1"


def tqdm(*args, **kwargs):
    """tqdm.auto interactively; in headless runs a plain bar that prints rarely, so saved notebooks stay readable."""
    if headless():
        from tqdm.std import tqdm as plain

        kwargs.setdefault("mininterval", 15)
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("ncols", 80)
        return plain(*args, **kwargs)
    from tqdm.auto import tqdm as auto

    return auto(*args, **kwargs)


def quiet_libraries() -> None:
    """Silence library progress bars and chatter that would clutter a headless notebook."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # lm-eval's "Generating test split" bars
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def print_table(header, rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
