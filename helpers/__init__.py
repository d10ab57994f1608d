"""The thin helpers the course notebooks call: one module per concern (see DESIGN.md)."""
import os as _os

from .paths import Work, work  # noqa: F401

_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if _os.environ.get("KIT_HEADLESS") == "1":
    from .progress import quiet_libraries as _quiet

    _quiet()
