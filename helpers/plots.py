"""Matplotlib set-up shared by every plot: a CJK font so Chinese renders, and a headless backend."""
from __future__ import annotations

import warnings

CJK_FONTS = ["Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Serif CJK SC", "Noto Serif CJK JP", "Source Han Sans SC",
             "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "Hiragino Sans GB"]
_warned = False


def cjk_font_name() -> str | None:
    """The first CJK font matplotlib can use, adding font files installed after its font list was cached."""
    from matplotlib import font_manager

    def known() -> str | None:
        installed = {f.name for f in font_manager.fontManager.ttflist}
        return next((name for name in CJK_FONTS if name in installed), None)

    if known() is None:  # matplotlib builds its font list once and never looks again: add what came since
        from .system_setup import cjk_font_files

        for path in cjk_font_files():
            try:
                font_manager.fontManager.addfont(path)
            except (OSError, RuntimeError, ValueError):
                continue
    return known()


def use_cjk_font() -> str | None:
    """Point matplotlib at an installed CJK font (fonts-noto-cjk on Debian); returns its name or None."""
    global _warned
    import matplotlib

    name = cjk_font_name()
    if name:
        matplotlib.rcParams["font.sans-serif"] = [name, "DejaVu Sans"]
        matplotlib.rcParams["font.family"] = "sans-serif"
        matplotlib.rcParams["axes.unicode_minus"] = False
        return name
    if not _warned:  # one sentence, not one warning per missing glyph
        warnings.warn("No CJK font found: Chinese in plots shows as boxes; install one "
                      "(apt-get install fonts-noto-cjk, or run `make run`, which installs it).", stacklevel=2)
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        _warned = True
    return None
