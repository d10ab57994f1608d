"""The machine's own tools the course needs besides Python packages: git, git-lfs, a CJK font (and, for the
tests, a browser). `make run` / `make test` call this first, before the virtual environment exists:

    python3 helpers/system_setup.py run|test

What is missing is installed where that can be done without asking (apt-get as root or with password-less
sudo, conda inside a conda environment, Homebrew on macOS); otherwise it stops at once with one sentence
naming what is missing and the command that installs it. Standard library only: it runs before the venv.
"""
from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys

MIN_PYTHON = (3, 10)
# Font files of CJK families matplotlib can use (helpers/plots.py picks among them by name).
CJK_FONT_GLOBS = ["*NotoSansCJK*", "*NotoSerifCJK*", "*SourceHanSans*", "*wqy*", "*WenQuanYi*", "*SimHei*",
                  "*msyh*", "*PingFang*", "*Hiragino Sans GB*"]
FONT_DIRS = ["/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.local/share/fonts"),
             os.path.expanduser("~/.fonts"), "/Library/Fonts", "/System/Library/Fonts",
             os.path.expanduser("~/Library/Fonts")]
# What each item is called by each installer; the web tests also need a browser and its driver.
PACKAGES = {
    "python3-venv": {"apt": ["python3-venv"]},
    "git": {"apt": ["git"], "conda": ["git"], "brew": ["git"]},
    "git-lfs": {"apt": ["git-lfs"], "conda": ["git-lfs"], "brew": ["git-lfs"]},
    "a CJK font": {"apt": ["fonts-noto-cjk"], "conda": ["font-ttf-noto-cjk"], "brew": ["--cask", "font-noto-sans-cjk-sc"]},
    "an emoji font": {"apt": ["fonts-noto-color-emoji"], "conda": ["font-ttf-noto-emoji"],
                      "brew": ["--cask", "font-noto-color-emoji"]},
    "chromium + chromedriver": {"apt": ["chromium", "chromium-driver"]},
}
PROFILES = {"run": ["python3-venv", "git", "git-lfs", "a CJK font", "an emoji font"],
            "test": ["python3-venv", "git", "git-lfs", "a CJK font", "an emoji font", "chromium + chromedriver"]}
EMOJI_FONT_GLOBS = ["*NotoColorEmoji*", "*Apple Color Emoji*", "*seguiemj*"]  # the report draws emoji with them


def cjk_font_files() -> list[str]:
    conda = os.environ.get("CONDA_PREFIX")
    dirs = FONT_DIRS + ([os.path.join(conda, "fonts"), os.path.join(conda, "share", "fonts")] if conda else [])
    return [f for d in dirs if os.path.isdir(d) for pattern in CJK_FONT_GLOBS
            for f in glob.glob(os.path.join(d, "**", pattern), recursive=True)
            if f.lower().endswith((".ttf", ".otf", ".ttc"))]


def _works(*command: str) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def present(item: str) -> bool:
    if item == "python3-venv":  # Debian splits venv's pip bootstrap off Python; an existing .venv needs none
        return os.path.exists(os.path.join(".venv", "bin", "python")) or _works(sys.executable, "-c", "import ensurepip")
    if item == "git":
        return shutil.which("git") is not None
    if item == "git-lfs":
        return shutil.which("git") is not None and _works("git", "lfs", "version")
    if item == "a CJK font":
        return bool(cjk_font_files())
    if item == "an emoji font":
        return any(glob.glob(os.path.join(d, "**", pattern), recursive=True)
                   for d in FONT_DIRS if os.path.isdir(d) for pattern in EMOJI_FONT_GLOBS)
    if item == "chromium + chromedriver":
        return os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")
    raise KeyError(item)


def installer() -> tuple[str, list[str], list[str]] | None:
    """(kind, command to refresh its package lists or [], command prefix to install) of an installer that works
    here without asking, or None."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if shutil.which("apt-get") and (root or (shutil.which("sudo") and _works("sudo", "-n", "true"))):
        sudo = [] if root else ["sudo", "-n"]
        return "apt", sudo + ["apt-get", "update", "-q"], sudo + ["apt-get", "install", "-y", "-q",
                                                                    "--no-install-recommends"]
    conda = shutil.which("mamba") or shutil.which("conda")
    if os.environ.get("CONDA_PREFIX") and conda:
        return "conda", [], [conda, "install", "-y", "-q", "-c", "conda-forge", "-p", os.environ["CONDA_PREFIX"]]
    if platform.system() == "Darwin" and shutil.which("brew"):
        return "brew", [], ["brew", "install"]
    return None


def install_hint(items: list[str]) -> str:
    """The command a person runs to install `items` on this kind of machine."""
    if platform.system() == "Darwin":
        return "brew install " + " ".join(p for i in items for p in PACKAGES[i].get("brew", [i]))
    if os.environ.get("CONDA_PREFIX"):
        return "conda install -c conda-forge " + " ".join(p for i in items for p in PACKAGES[i].get("conda", [i]))
    sudo = "" if hasattr(os, "geteuid") and os.geteuid() == 0 else "sudo "
    return f"{sudo}apt-get install " + " ".join(p for i in items for p in PACKAGES[i].get("apt", [i]))


def refresh_font_caches() -> None:
    """fc-cache, and matplotlib's font list (it keeps the fonts it found on first import and never looks again)."""
    if shutil.which("fc-cache"):
        _works("fc-cache", "-f")
    cache = os.environ.get("MPLCONFIGDIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "matplotlib")
    for stale in glob.glob(os.path.join(cache, "fontlist-*.json")):
        os.remove(stale)


def setup(profile: str = "run") -> int:
    if sys.version_info < MIN_PYTHON:
        print(f"error: the course needs Python {'.'.join(map(str, MIN_PYTHON))} or newer and python3 is "
              f"{platform.python_version()}; install a newer Python (e.g. apt-get install python3.11).", file=sys.stderr)
        return 2
    missing = [item for item in PROFILES[profile] if not present(item)]
    if not missing:
        return 0
    how = installer()
    installable = [i for i in missing if how and how[0] in PACKAGES[i]]
    if installable:
        print(f"set-up: installing {', '.join(installable)} with {how[0]} ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if how[1]:
            subprocess.run(how[1], env=env, stdout=subprocess.DEVNULL)
        subprocess.run(how[2] + [p for i in installable for p in PACKAGES[i][how[0]]], env=env, stdout=subprocess.DEVNULL)
    if "git-lfs" in missing and present("git-lfs"):
        _works("git", "lfs", "install", "--skip-repo")
    if any(font in missing and present(font) for font in ("a CJK font", "an emoji font")):
        refresh_font_caches()
    still = [item for item in missing if not present(item)]
    if still:
        names = f"{', '.join(still[:-1])} and {still[-1]}" if len(still) > 1 else still[0]
        print(f"error: this machine lacks {names} (needed for "
              f"{'the tests' if still == ['chromium + chromedriver'] else 'the course'}) and the set-up could not "
              f"install {'it' if len(still) == 1 else 'them'}; run `{install_hint(still)}`, then try again.",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(setup(sys.argv[1] if len(sys.argv) > 1 else "run"))
