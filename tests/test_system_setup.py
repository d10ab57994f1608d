"""The set-up `make run` / `make test` start with, the pre-flight table of notebook 00, and the plots' CJK font."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from helpers import system_setup

ROOT = Path(__file__).resolve().parent.parent


def bin_with(tmp_path, *tools) -> str:
    """A PATH holding only `tools` (linked from this machine)."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for tool in tools:
        (d / tool).symlink_to(shutil.which(tool))
    return str(d)


def test_where_nothing_can_install_it_stops_at_once_naming_what_and_how(tmp_path):
    # git without git-lfs, no apt-get, no conda, no brew, no font directories: the set-up cannot install anything
    env = {"PATH": bin_with(tmp_path, "git"), "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
    code = ("import sys; from helpers import system_setup as s; s.FONT_DIRS[:] = []; "
            "s.installer = lambda: None; sys.exit(s.setup('run'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: this machine lacks git-lfs, a CJK font and an emoji font")
    assert "apt-get install git-lfs fonts-noto-cjk fonts-noto-color-emoji`" in r.stderr


def test_an_installer_is_used_and_then_checked(monkeypatch):
    calls = []
    have = {"python3-venv": True, "git": True, "git-lfs": False, "a CJK font": False, "an emoji font": True}
    monkeypatch.setattr(system_setup, "present", lambda item: have[item])
    monkeypatch.setattr(system_setup, "installer", lambda: ("conda", [], ["conda", "install", "-y"]))

    def fake_run(command, **kw):
        calls.append(command)
        have.update({"git-lfs": True, "a CJK font": True})
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(system_setup.subprocess, "run", fake_run)
    monkeypatch.setattr(system_setup, "_works", lambda *a: True)
    monkeypatch.setattr(system_setup, "refresh_font_caches", lambda: calls.append("refresh"))
    assert system_setup.setup("run") == 0
    assert calls == [["conda", "install", "-y", "git-lfs", "font-ttf-noto-cjk"], "refresh"]


def test_the_makefile_sets_up_before_anything_else():
    make = (ROOT / "Makefile").read_text()
    assert "run: system-run venv" in make and "test: system-test venv" in make
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_preflight_rows_say_fix_and_notebooks_for_each_cross(monkeypatch):
    from helpers import environment

    monkeypatch.setenv("PATH", "/nonexistent")  # no git, no git-lfs
    rows = {r["check"]: r for r in environment.preflight()}
    assert set(rows) == {"git", "git-lfs", "CJK font for matplotlib", "streamlit", "browser for the web test",
                         "GPU / 4-bit QLoRA"}
    for check in ("git", "git-lfs"):
        assert rows[check]["status"] == "✗" and "apt-get install" in rows[check]["fix"]
        assert "06" in rows[check]["affects"]
    assert rows["streamlit"]["status"] == "✓" and rows["streamlit"]["fix"] == ""
    assert all(r["status"] in "✓✗" and bool(r["fix"]) == (r["status"] == "✗") for r in rows.values())


def test_a_font_installed_after_matplotlib_cached_its_list_is_found(monkeypatch):
    from matplotlib import font_manager

    from helpers.plots import CJK_FONTS, cjk_font_name

    assert system_setup.cjk_font_files(), "install a CJK font (make test does: fonts-noto-cjk)"
    stale = [f for f in font_manager.fontManager.ttflist if f.name not in CJK_FONTS]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", stale)
    assert cjk_font_name() in CJK_FONTS


def test_plots_render_chinese_without_glyph_warnings():
    from helpers.train import loss_plot_png

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = loss_plot_png([{"step": 1, "loss": 2.0, "lr": 1e-3}, {"step": 2, "loss": 1.0, "lr": 1e-3}], "训练损失")
    assert png.startswith(b"\x89PNG")
    assert not [w for w in caught if "Glyph" in str(w.message) or "CJK" in str(w.message)]
