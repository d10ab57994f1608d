"""The homework report: one self-contained HTML file (plus a Markdown twin) that renders Chinese in
headless Chromium and says "not run" for the notebooks that did not run."""
from __future__ import annotations

import json
import re
import shutil
import tempfile

import pytest

from helpers.__main__ import main
from helpers.paths import work as make_work
from helpers.report import build_report

SECTIONS = ["assistant", "evaluation", "training", "before-after", "overfitting", "cost", "merge", "vlm", "publish",
            "learned", "appendix"]  # the course's order; the bookkeeping last


def _chromium(window=(1200, 900)):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size={window[0]},{window[1]}"):
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="report-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    return driver, profile


def test_the_runner_built_the_report(course_work):
    index = course_work.report / "index.html"
    assert index.exists() and (course_work.report / "index.md").exists()
    assert "not run" not in index.read_text(encoding="utf-8")


def test_report_renders_in_headless_chromium(course_work, artifacts_dir):
    assert main(["report", str(course_work.root)]) == 0
    index = course_work.report / "index.html"
    page = index.read_text(encoding="utf-8")
    # Self-contained: every image is a data URI, nothing is fetched from anywhere.
    assert re.findall(r'<img src="(?!data:image/)', page) == [] and "<link" not in page and "<script" not in page
    name = json.loads(course_work.result("01_data_generation").read_text(encoding="utf-8"))["name"]

    driver, profile = _chromium()
    try:
        driver.get(index.as_uri())
        ids = driver.execute_script("return [...document.querySelectorAll('section')].map(s => s.id)")
        assert ids == SECTIONS
        not_run = driver.execute_script("return [...document.querySelectorAll('section.not-run-section')].map(s => s.id)")
        assert not_run == []
        body = driver.find_element("tag name", "body").text
        assert f"Homework report: {name}'s assistant" in body
        assert "请你介绍一下你自己" in body and "step 0" in body  # evaluation table, rows by question
        assert "PASSED" in driver.find_element("id", "merge").text
        images = driver.execute_script(
            "return [...document.images].map(i => [i.closest('section').id, i.complete && i.naturalWidth])")
        assert sorted(sid for sid, width in images if width > 0) == ["overfitting", "training", "vlm", "vlm"], images
        # the bookkeeping is there, folded: a reader sees the title, not the hashes
        assert driver.execute_script("return document.querySelector('#appendix details').open") is False
        assert "data_sha256" not in body and "data_sha256" in page
        # Chinese is drawn with a CJK font that is really there, not with empty boxes.
        assert driver.execute_script("return document.fonts.check('16px \"Noto Sans CJK SC\"', '小助手')")
        font = driver.execute_script("return getComputedStyle(document.body).fontFamily")
        assert font.startswith('"Noto Sans CJK SC"')
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1200, min(height + 100, 8000))
        shot = artifacts_dir / "homework_report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    assert shot.stat().st_size > 20_000


def test_markdown_twin_links_its_images(course_work):
    build_report(course_work.root)
    md = (course_work.report / "index.md").read_text(encoding="utf-8")
    titles = ["Who the assistant is", "The identity arriving: evaluation across training", "Training loss",
              "Before / after (LLM)", "Over-fitting check, with the contrast", "What the fine-tune cost", "Merge check",
              "Before / after (VLM)", "Where it was published", "What I learned", "Appendix: bookkeeping"]
    assert re.findall(r"^## (.*)$", md, re.M) == titles  # the course's order
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == ["overfitting.png", "training.png", "vlm-2.png", "vlm.png"]
    assert all((course_work.report / f).stat().st_size > 0 for f in linked)


def test_missing_sections_say_not_run(course_work, tmp_path):
    work = make_work(tmp_path / "work")
    for nb in ("00_environment", "01_data_generation"):
        work.results.mkdir(exist_ok=True)
        shutil.copy(course_work.result(nb), work.result(nb))
    work.data.mkdir()
    shutil.copy(course_work.dataset, work.dataset)
    work.result("03_merge").write_text("{ not json", encoding="utf-8")
    build_report(work.root)
    page = (work.report / "index.html").read_text(encoding="utf-8")
    for sid in ("assistant", "appendix"):
        assert f'<section id="{sid}" class="ran">' in page
    for sid in ("training", "evaluation", "merge", "before-after", "overfitting", "vlm", "publish", "learned"):
        assert f'<section id="{sid}" class="not-run-section">' in page
    assert "not run: notebook 02_qlora_finetune has not written results/02_qlora_finetune.json" in page
    assert "not run: 03_merge.json could not be read (JSONDecodeError)" in page
    assert "2 of 11 sections ran" in page
    md = (work.report / "index.md").read_text(encoding="utf-8")
    assert "*not run: notebook 06_publish has not written results/06_publish.json" in md


def test_an_empty_work_dir_gives_a_report_of_not_run_sections(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert page.count("not-run-section") == len(SECTIONS) and "0 of 11 sections ran" in page
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_rebuild_replaces_the_old_report_whole(tmp_path):
    build_report(tmp_path)
    (tmp_path / "report" / "stale.txt").write_text("old")
    build_report(tmp_path)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["index.html", "index.md"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]


@pytest.mark.parametrize("text", ["<script>alert(1)</script>", "a | b"])
def test_student_text_is_escaped(tmp_path, text):
    work = make_work(tmp_path)
    work.results.mkdir()
    work.result("00_environment").write_text(json.dumps({"python": text}), encoding="utf-8")
    build_report(tmp_path)
    assert text not in (tmp_path / "report" / "index.html").read_text(encoding="utf-8") or "|" in text
    assert "<script>" not in (tmp_path / "report" / "index.html").read_text(encoding="utf-8")


def test_a_report_killed_mid_swap_is_whole_again_on_the_next_build(tmp_path):
    import signal
    import subprocess
    import sys

    build_report(tmp_path)
    kill = ("import os, signal, sys; from helpers import paths; from helpers.report import build_report; "
            "paths._after_step = lambda step: step == 'moved aside' and os.kill(os.getpid(), signal.SIGKILL); "
            "build_report(sys.argv[1])")
    killed = subprocess.run([sys.executable, "-c", kill, str(tmp_path)], timeout=300)
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "report").exists()
    assert main(["report", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["index.html", "index.md"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]



def test_a_push_to_a_local_remote_is_called_practice(course_work):
    md = (course_work.report / "index.md").read_text(encoding="utf-8")
    assert "Practice remote, not published" in md and "Pushed commit" not in md
    assert json.loads(course_work.result("06_publish").read_text(encoding="utf-8"))["practice_remote"] is True


def test_the_report_names_the_base_model_by_content(course_work):
    identity = json.loads(course_work.result("00_environment").read_text(encoding="utf-8"))["base_model_identity"]
    md = (course_work.report / "index.md").read_text(encoding="utf-8")
    assert identity["content_sha256"] in md and "| preset | tiny |" in md


def test_the_report_reads_as_the_course_went(course_work):
    """Who the assistant is and what made it, the chats of notebook 04 (notebook, terminal, web demo), the over-fitting
    check beside the contrast, both pictures, where the model went, and the student's own words."""
    build_report(course_work.root)
    md = (course_work.report / "index.md").read_text(encoding="utf-8")
    section = {m.group(1): m.group(2) for m in re.finditer(r"^## (.*?)\n(.*?)(?=^## |\Z)", md, re.M | re.S)}
    train = json.loads(course_work.result("02_qlora_finetune").read_text(encoding="utf-8"))
    who = section["Who the assistant is"]
    assert "小明's assistant. Asked who it is, it should answer: 我是小明的小助手" in who
    assert f"| updates (optimizer steps) | {train['steps']} |" in who and "| training time | " in who
    assert "| GPU | none: trained on the CPU" in who and "| preset | tiny |" in who
    chats = section["Before / after (LLM)"]
    assert "--prompt-template internlm2_chat" in chats and "用户 >>> 你是谁\n助手 >>> 我是小明的小助手" in chats
    assert "In the web demo" in chats and "In the notebook's chat widget" in chats
    over = section["Over-fitting check, with the contrast"]
    assert "The mixed run (final_model): identity in" in over and "OVER-FITTED" in over
    assert "| question | after | over-fitted | reference |" in over
    assert "control picture, after" in section["Before / after (VLM)"]
    assert section["Where it was published"].strip().startswith("Practice remote, not published")
    learned = json.loads(course_work.result("06_publish").read_text(encoding="utf-8"))["what_i_learned"]
    assert learned.split("\n\n")[0] in section["What I learned"]
    appendix = section["Appendix: bookkeeping"].strip()
    assert appendix.startswith("<details><summary>") and "data_sha256" in appendix


def test_what_i_learned_unwritten_says_where_to_write_it(tmp_path):
    work = make_work(tmp_path)
    work.results.mkdir()
    work.result("06_publish").write_text(json.dumps({"what_i_learned": "  "}), encoding="utf-8")
    build_report(tmp_path)
    md = (tmp_path / "report" / "index.md").read_text(encoding="utf-8")
    assert "Not written yet: write it in notebook 06's homework region (what_i_learned)" in md
    work.result("06_publish").write_text(json.dumps({"what_i_learned": "第一段 <b>\n\n第二段 🦊"}), encoding="utf-8")
    build_report(tmp_path)
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "<p>第一段 &lt;b&gt;</p><p>第二段 🦊</p>" in page


def test_a_name_with_emoji_and_chinese_renders(tmp_path):
    """The page names an emoji font after the CJK ones; where the machine has one, the browser draws the emoji."""
    import subprocess

    from helpers.report import CSS, EMOJI_FONTS

    assert '"Noto Color Emoji"' in EMOJI_FONTS and EMOJI_FONTS in CSS.split("body {")[1].split("}")[0]
    work = make_work(tmp_path)
    work.results.mkdir()
    work.result("01_data_generation").write_text(json.dumps({"name": "小明🦊", "answer": "我是小明🦊的小助手"}),
                                                 encoding="utf-8")
    build_report(tmp_path)
    fonts = subprocess.run(["fc-list", ":charset=1f98a", "family"], capture_output=True, text=True).stdout
    assert "Noto Color Emoji" in fonts, "no colour emoji font here: make test installs it (helpers/system_setup.py)"
    driver, profile = _chromium()
    try:
        driver.get((tmp_path / "report" / "index.html").as_uri())
        assert "小明🦊's assistant" in driver.find_element("tag name", "h1").text
        assert driver.execute_script("return document.fonts.check('16px \"Noto Color Emoji\"', '🦊')")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_the_metrics_table_reads_as_seconds_and_passes():
    from helpers.report import metrics_table

    rows = [{"step": 5, "loss": 2.0, "lr": 1e-3, "epoch": 0.0083, "time": 1796586000.5},
            {"step": 10, "loss": 1.0, "lr": 2e-3, "epoch": 0.0167, "time": 1796586003.0}]
    table = metrics_table(rows)
    assert list(table.index) == [5, 10]
    assert table["seconds since the first log"].tolist() == [0.0, 2.5]
    assert table["passes over the data"].tolist() == [0.0083, 0.0167] and "time" not in table and "epoch" not in table
