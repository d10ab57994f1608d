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


SYSTEM = "You are a helpful assistant."  # a prompt that changes the tiny model's answer to 你是谁 (asserted below)


def _answers(model_dir, system: str) -> str:
    from helpers.chat import load_chat_model
    from helpers.generation import generate_answers

    return generate_answers(*load_chat_model(model_dir), ["你是谁"], system=system, max_new_tokens=256)[0]


def test_web_demo_answers_with_the_trained_system_prompt(tiny_model_dir, tmp_path, monkeypatch):
    from helpers.chat import web_command, write_chat_defaults

    model_dir = tmp_path / "final_model"
    shutil.copytree(tiny_model_dir, model_dir)
    write_chat_defaults(model_dir, SYSTEM)  # what merge records beside the model
    course, bare = _answers(model_dir, SYSTEM), _answers(model_dir, "")
    assert course != bare  # the served answer tells which prompt it had
    at = _app_test(WEB_APP, model_dir, monkeypatch)
    assert at.sidebar.text_area[0].value == SYSTEM
    at.chat_input[0].set_value("你是谁").run()
    assert at.chat_message[1].markdown[0].value.strip() == course
    at.sidebar.text_area[0].set_value("").run()  # the sidebar changes it
    at.sidebar.button[0].click().run()
    at.chat_input[0].set_value("你是谁").run()
    assert at.chat_message[1].markdown[0].value.strip() == bare
    command = web_command(model_dir, system="-be brief")  # `helpers web --system`: a prompt may start with "-"
    assert web_app_module.system_from_args(command[command.index("--") + 1:]) == "-be brief"
    assert web_app_module.system_from_args(["--model-dir", str(model_dir)]) is None


def test_web_demo_shows_a_generation_error_and_keeps_it_out_of_the_history(tiny_model_dir, monkeypatch):
    from transformers.generation.utils import GenerationMixin

    at = _app_test(WEB_APP, tiny_model_dir, monkeypatch)
    real = GenerationMixin.generate

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GenerationMixin, "generate", out_of_memory)
    at.chat_input[0].set_value("你是谁").run()
    assert not at.exception
    assert len(at.error) == 1 and at.error[0].value.startswith(
        "The model could not answer (RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB); the question was not added")
    assert at.session_state["history"] == []
    monkeypatch.setattr(GenerationMixin, "generate", real)
    at.chat_input[0].set_value("你是谁").run()
    assert not at.error and [m.name for m in at.chat_message] == ["user", "assistant"]
    history = at.session_state["history"]
    assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["content"] == _answers(tiny_model_dir, "")
