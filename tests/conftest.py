"""Shared fixtures. The whole course runs once per test session (headless, tiny model) and the
tests that need its artifacts read them from `course_work`."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Everything the suite writes, nbval's kernels included, goes to a temporary work dir (not ./work).
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="course-tests-"))
os.environ.setdefault("COURSE_WORK_DIR", str(_SESSION_DIR / "nbval-work"))
os.environ["KIT_HEADLESS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"  # screenshots kept by browser tests


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's work dirs after a green run; keep them to inspect after a red one."""
    if exitstatus == 0:
        import shutil

        shutil.rmtree(_SESSION_DIR, ignore_errors=True)
    else:
        print(f"\nwork dirs of this test session kept for inspection: {_SESSION_DIR}")


@pytest.fixture(scope="session")
def course_work():
    """A work dir after `python -m helpers run` over every notebook (default parameters)."""
    from helpers.paths import work
    from helpers.runner import run_course

    w = work(_SESSION_DIR / "course")
    assert run_course(w.root, quiet=True) == 0, f"the course run failed; see {w.executed}"
    return w


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The embedded tiny base model, built once per session."""
    from helpers.tiny_model import build_tiny_model

    return build_tiny_model(_SESSION_DIR / "tiny-model")


@pytest.fixture(scope="session")
def internlm2_standin():
    """A folder laid out like internlm2-chat-1_8b (real tokenizer.model and config files, remote code that must
    not run, tiny random weights in InternLM2's layout), built once per session."""
    from internlm2_standin import build_standin

    path = _SESSION_DIR / "internlm2-chat-1_8b"
    build_standin(path)
    return path


@pytest.fixture(scope="session")
def internlm2_converted(internlm2_standin):
    """The stand-in converted once to the Llama layout, as notebook 00 does."""
    from helpers.internlm2 import convert_internlm2

    return convert_internlm2(internlm2_standin, _SESSION_DIR / "internlm2-converted")


@pytest.fixture(scope="session")
def artifacts_dir():
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# ---------------------------------------------------------------- a real browser against a Streamlit app
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_servers(tmp_path):
    """start(argv, name, ready, cwd=None, env=None) runs a server on a free port ("{port}" in argv is filled in),
    its output in a log file, until ready(url) answers True; returns the URL. Every server stops after the test."""
    import subprocess
    import time

    servers = []

    def start(argv: list[str], name: str, ready, cwd=None, env=None) -> str:
        port = _free_port()
        log = (tmp_path / f"{name}-{port}.log").open("w")  # a file, not a pipe nobody drains (a full pipe stalls it)
        server = subprocess.Popen([a.replace("{port}", str(port)) for a in argv], cwd=cwd, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        servers.append((server, log))
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            assert server.poll() is None, f"{name} exited: {Path(log.name).read_text()}"
            try:
                if ready(url):
                    return url
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{name} did not answer: {Path(log.name).read_text()}")

    yield start
    for server, log in servers:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture
def streamlit_server(local_servers):
    """start(args, cwd=None, env=None) runs `python -m *args` ("{port}" in args is filled in with a free port),
    waits until the Streamlit server is healthy and returns its URL; the server is stopped after the test."""
    import sys
    import urllib.request

    def healthy(url: str) -> bool:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.read().strip() == b"ok"

    def start(command: list[str], cwd=None, env=None) -> str:
        return local_servers([sys.executable, "-m", *command], "streamlit", healthy, cwd=cwd, env=env)

    return start


@pytest.fixture
def browser():
    """Debian's Chromium, headless, driven by selenium through Debian's chromedriver."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), "install chromium and chromium-driver (.ci/run does)"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def chat_in_browser(browser, artifacts_dir):
    """ask(url, question, expected, screenshot) types into the chat app's box and waits for the streamed answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def messages(driver):
        return [m.text for m in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stChatMessage']")]

    def ask(url: str, question: str, expected: str, screenshot: str) -> list[str]:
        browser.get(url)
        wait = WebDriverWait(browser, 600, poll_frequency=0.2)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "textarea[data-testid='stChatInputTextArea']"))
        box.send_keys(question)
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: len(messages(d)) == 2 and expected in messages(d)[1])
        shot = artifacts_dir / screenshot
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        return messages(browser)

    return ask
