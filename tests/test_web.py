"""The Streamlit chat demo: through streamlit's AppTest, and end to end in a real headless Chromium."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path


import helpers.web_app as web_app_module

IDENTITY = "我是小明的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦"
WEB_APP = Path(web_app_module.__file__)


def test_web_app_is_self_contained():
    """It is copied as-is into the deployable app, so it may import only streamlit, transformers, torch, stdlib."""
    tree = ast.parse(WEB_APP.read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert not any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(tree))
    assert names - set(sys.stdlib_module_names) == {"streamlit", "transformers", "torch"}


def test_model_dir_comes_from_argument_then_environment(monkeypatch):
    monkeypatch.setenv("CHAT_MODEL_DIR", "/from/env")
    assert web_app_module.model_dir_from_args(["--model-dir", "/from/arg"]) == "/from/arg"
    assert web_app_module.model_dir_from_args(["-x", "tests"]) == "/from/env"
    monkeypatch.delenv("CHAT_MODEL_DIR")
    assert web_app_module.model_dir_from_args([]) == str(WEB_APP.parent / "final_model")


def _app_test(app_file: Path, model_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CHAT_MODEL_DIR", str(model_dir))
    return AppTest.from_file(str(app_file), default_timeout=300).run()


def test_app_answers_the_identity_question(course_work, tmp_path, monkeypatch):
    app = shutil.copy(WEB_APP, tmp_path / "app.py")  # a lone copy, as it is deployed
    at = _app_test(Path(app), course_work.final_model, monkeypatch)
    assert not at.exception and not at.error
    assert len(at.sidebar.slider) == 3 and at.sidebar.text_area[0].label == "System prompt"
    at.chat_input[0].set_value("你是谁").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert IDENTITY in at.chat_message[1].markdown[0].value
    at.chat_input[0].set_value("请你介绍一下你自己").run()  # history: the first turn is shown again
    assert [m.name for m in at.chat_message] == ["user", "assistant"] * 2
    # The tiny model answers one turn at a time: with the first turn in its prompt its answer frays, but it still
    # starts as the assistant it was taught to be.
    assert at.chat_message[2].markdown[0].value == "请你介绍一下你自己"
    assert at.chat_message[3].markdown[0].value.startswith("我是小明的")
    at.sidebar.button[0].click().run()
    assert len(at.chat_message) == 0


def test_app_names_a_bad_model_dir(tmp_path, monkeypatch):
    at = _app_test(WEB_APP, tmp_path / "nowhere", monkeypatch)
    assert "no such model directory" in at.error[0].value and "CHAT_MODEL_DIR" in at.error[0].value
    (tmp_path / "empty").mkdir()
    at = _app_test(WEB_APP, tmp_path / "empty", monkeypatch)
    assert "has no config.json" in at.error[0].value


def test_web_command_refuses_a_bad_model_dir(tmp_path):
    result = subprocess.run([sys.executable, "-m", "helpers", "web", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no such directory" in result.stderr


def test_chat_in_a_real_browser(course_work, streamlit_server, browser, chat_in_browser):
    from selenium.webdriver.common.by import By

    url = streamlit_server(["helpers", "web", str(course_work.final_model), "--port", "{port}"])
    shown = chat_in_browser(url, "你是谁", IDENTITY, "web_chat.png")
    assert "你是谁" in shown[0]
    assert "chat demo" in browser.title or "chat demo" in browser.find_element(By.TAG_NAME, "h1").text
