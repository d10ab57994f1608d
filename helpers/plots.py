"""Matplotlib set-up shared by every plot: a CJK font so Chinese renders, and a headless backend."""
from __future__ import annotations

import warnings

CJK_FONTS = ["Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Serif CJK SC", "WenQuanYi Zen Hei", "SimHei",
             "Microsoft YaHei", "PingFang SC", "Source Han Sans SC"]


def use_cjk_font() -> str | None:
    """Point matplotlib at an installed CJK font (fonts-noto-cjk on Debian); returns its name or None."""
    import matplotlib
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in installed:
            matplotlib.rcParams["font.sans-serif"] = [name, "DejaVu Sans"]
            matplotlib.rcParams["font.family"] = "sans-serif"
            matplotlib.rcParams["axes.unicode_minus"] = False
            return name
    warnings.warn("No CJK font found: Chinese in plots shows as boxes; install one (apt-get install fonts-noto-cjk).")
    return None
