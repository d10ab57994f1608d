"""The deployable app bundle: its files, the first-start fetch of the model with git-lfs and its cache, and the
app answering from the pulled model (streamlit's AppTest, and a real headless Chromium)."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from helpers import publish
from helpers.paths import work as make_work
from test_publish import verified_final_model

IDENTITY = "我是小明的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦"


@pytest.fixture
def pushed(tmp_path, tiny_model_dir):
    """A work dir whose tiny final_model was pushed to its local bare remote, and the app bundle built on it."""
    w = make_work(tmp_path / "work")
    verified_final_model(tiny_model_dir, w.final_model)
    publish.build_model_repo(w, "m")
    url = publish.default_remote(w)
    result = publish.push_model_repo(w, url)
    publish.build_app_bundle(w, url, title="测试助手")
    return w, url, result


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"bundle_{path.stem}_{id(path)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deploy_copy(app_dir: Path, dest: Path) -> Path:
    """The bundle as a platform gets it: its files alone, in an empty folder, no model cache."""
    shutil.copytree(app_dir, dest)
    assert not (dest / "model_cache").exists()
    return dest


def without_model_settings(monkeypatch) -> None:
    """The app reads its model from app_config.json alone: no MODEL_* setting of this shell reaches it."""
    for name in ("MODEL_REPO_URL", "MODEL_REVISION", "MODEL_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_bundle_files(pushed):
    w, url, _ = pushed
    app = w.app
    assert (app / ".streamlit" / "config.toml").read_text().startswith("[server]")
    assert sorted(p.name for p in app.iterdir()) == [".gitignore", ".streamlit", "README.md", "app.py", "app_config.json",
                                                     "chat_app.py", "fetch_model.py", "packages.txt", "requirements.txt"]
    assert (app / "chat_app.py").read_bytes() == publish.WEB_APP.read_bytes()
    assert (app / "packages.txt").read_text().split() == ["git", "git-lfs"]
    lines = (app / "requirements.txt").read_text().split()
    assert lines[:2] == ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]  # a CPU app: torch's CPU build
    requirements = dict(line.split("==") for line in lines[2:])
    assert {"streamlit", "transformers", "torch", "tokenizers", "safetensors"} <= set(requirements)
    assert requirements["torch"] == version("torch").split("+")[0] + "+cpu"
    for name, pinned in requirements.items():
        assert version(name).split("+")[0] == pinned.split("+")[0]
    assert json.loads((app / "app_config.json").read_text()) == {"model_repo_url": url, "revision": "main",
                                                                "title": "测试助手", "system": None}
    readme = (app / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(readme.split("---\n")[1])
    assert front["sdk"] == "streamlit" and front["app_file"] == "app.py" and front["sdk_version"] == version("streamlit")
    assert "## Deploy on OpenXLab" in readme and "## Deploy on Hugging Face Spaces" in readme
    size = publish.install_footprint(publish.APP_REQUIREMENTS)
    assert size["mb"] > 100 and f"about {size['mb']} MB on disk" in readme
    for name in ("app.py", "fetch_model.py"):  # deployable: the standard library, streamlit and the bundle only
        tree = ast.parse((app / name).read_text(encoding="utf-8"))
        used = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        used |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert used - set(sys.stdlib_module_names) <= {"streamlit", "chat_app", "fetch_model"}, name


def test_bundle_config_never_holds_credentials(pushed, monkeypatch):
    w, url, _ = pushed
    before = (w.app / "app_config.json").read_bytes()
    for bad, what in (("https://student@hub.example/student/model.git", "a user name"),
                      ("https://student:hf_s3cr3tXYZ@hub.example/student/model.git", "a password or token"),
                      ("https://hub.example/student/model.git?token=hf_s3cr3tXYZ", "a query")):
        with pytest.raises(publish.PublishError, match=f"has {what}.* written into it") as e:
            publish.build_app_bundle(w, bad)
        assert "hf_s3cr3tXYZ" not in str(e.value)
    assert (w.app / "app_config.json").read_bytes() == before  # the bundle built before is kept whole
    fetch = load_module(w.app / "fetch_model.py")  # the deployed app refuses one set on the platform too
    monkeypatch.setenv("MODEL_REPO_URL", "https://student:hf_s3cr3tXYZ@hub.example/student/model.git")
    with pytest.raises(fetch.FetchError, match="has credentials written into it.*MODEL_REPO_TOKEN") as e:
        fetch.settings(w.app)
    assert "hf_s3cr3tXYZ" not in str(e.value)


def test_gpu_bundle_and_a_pushed_hub_remote(pushed):
    w, url, _ = pushed
    publish.build_app_bundle(w, url, device="cuda")  # a GPU app: PyPI's torch (the CUDA build), no extra index
    lines = (w.app / "requirements.txt").read_text().split()
    assert not any(line.startswith("--") for line in lines) and f"torch=={version('torch').split('+')[0]}" in lines
    # once the model went to a hub, a later local-only run does not point the app back at this machine
    w.results.mkdir(parents=True, exist_ok=True)
    w.result("06_publish").write_text(json.dumps({"remote": "https://hub.example/u/m.git", "commit": "abc"}))
    publish.build_app_bundle(w, url)
    assert json.loads((w.app / "app_config.json").read_text())["model_repo_url"] == "https://hub.example/u/m.git"
    with pytest.raises(publish.PublishError, match="device is 'tpu'"):
        publish.build_app_bundle(w, url, device="tpu")


def test_fetch_clones_once_then_uses_the_cache(pushed, tmp_path):
    w, url, result = pushed
    fetch = load_module(w.app / "fetch_model.py")
    cache = tmp_path / "cache"
    model = fetch.fetch_model(url, cache)
    assert model == cache / "model" and not (model / ".git").exists()
    assert fetch.fetched_commit(model) == result.commit
    built = {f["path"]: f["sha256"] for f in publish.repo_files(w.model_repo)}
    got = {f["path"]: f["sha256"] for f in publish.repo_files(model) if f["path"] != fetch.MARKER}
    assert got == built  # weights included, not LFS pointers
    assert sorted(p.name for p in cache.iterdir()) == ["model"]  # no temp dirs left

    stamp = (model / "model.safetensors").stat().st_mtime_ns
    w.publish_remote.rename(tmp_path / "remote-gone.git")  # a second start must not need the remote
    assert fetch.fetch_model(url, cache) == model and (model / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(fetch.FetchError, match="^cloning .* failed .*check the URL"):
        fetch.fetch_model(url, cache, refresh=True)
    assert fetch.fetched_commit(model) == result.commit  # the cached copy survives a failed refresh
    assert sorted(p.name for p in cache.iterdir()) == ["model"]


def test_fetch_refuses_a_repository_that_is_not_a_model(pushed, tmp_path):
    w, _, _ = pushed
    app_remote = tmp_path / "app.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(app_remote)], check=True)
    publish.push_folder(w.app, app_remote.as_uri(), message="Deploy the chat demo")  # the app's own remote
    fetch = load_module(w.app / "fetch_model.py")
    with pytest.raises(fetch.FetchError, match="has no config.json at its top level"):
        fetch.fetch_model(app_remote.as_uri(), tmp_path / "cache")
    assert not (tmp_path / "cache" / "model").exists()


def test_settings_come_from_config_then_environment(pushed, monkeypatch, tmp_path):
    w, url, _ = pushed
    fetch = load_module(w.app / "fetch_model.py")
    without_model_settings(monkeypatch)
    monkeypatch.delenv("MODEL_SYSTEM_PROMPT", raising=False)
    assert fetch.settings(w.app) == {"model_repo_url": url, "revision": "main",
                                     "cache_dir": str(w.app / "model_cache"), "title": "测试助手", "system": None}
    monkeypatch.setenv("MODEL_SYSTEM_PROMPT", "")  # set on the platform, even empty, it wins
    assert fetch.settings(w.app)["system"] == ""
    monkeypatch.setenv("MODEL_REPO_URL", "https://hub.example/u/other.git")
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "c"))
    got = fetch.settings(w.app)
    assert got["model_repo_url"] == "https://hub.example/u/other.git" and got["cache_dir"] == str(tmp_path / "c")
    monkeypatch.delenv("MODEL_REPO_URL")
    with pytest.raises(fetch.FetchError, match="no model repository configured"):
        fetch.settings(tmp_path)


def _chat(app_file: Path, question: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(app_file), default_timeout=600).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.chat_input[0].set_value(question).run()
    assert not at.exception
    return at


def test_app_from_an_empty_dir_answers_from_the_pulled_model(pushed, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.generation import generate_answers

    w, _, result = pushed
    without_model_settings(monkeypatch)
    app = deploy_copy(w.app, tmp_path / "deployed")
    at = _chat(app / "app.py", "请你介绍一下你自己")
    assert (app / "model_cache" / "model" / "model.safetensors").read_bytes() == (w.final_model / "model.safetensors").read_bytes()
    assert at.title[0].value == "测试助手" and result.commit[:12] in at.caption[-1].value
    model = AutoModelForCausalLM.from_pretrained(w.final_model)
    expected = generate_answers(model, AutoTokenizer.from_pretrained(w.final_model), ["请你介绍一下你自己"])[0]
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert at.chat_message[1].markdown[0].value.strip() == expected


def test_app_serves_the_new_commit_after_a_re_push(pushed, tmp_path, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    w, url, first = pushed
    without_model_settings(monkeypatch)
    app = deploy_copy(w.app, tmp_path / "deployed")
    at = AppTest.from_file(str(app / "app.py"), default_timeout=300).run()
    assert not at.exception and f"serving commit {first.commit[:12]}" in at.caption[-1].value
    publish.build_model_repo(w, "retrained")  # the student publishes again: a new commit on the remote
    second = publish.push_model_repo(w, url)
    fetch = load_module(app / "fetch_model.py")
    assert second.commit != first.commit and fetch.remote_commit(url) == second.commit
    st.cache_data.clear()  # the app asks the remote once a minute; skip the wait
    at = AppTest.from_file(str(app / "app.py"), default_timeout=300).run()
    assert not at.exception and f"serving commit {second.commit[:12]}" in at.caption[-1].value
    assert fetch.fetched_commit(app / "model_cache" / "model") == second.commit
    assert "# retrained" in (app / "model_cache" / "model" / "README.md").read_text(encoding="utf-8")


def test_app_names_an_unreachable_model_repository(pushed, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    w, _, _ = pushed
    app = deploy_copy(w.app, tmp_path / "deployed")
    monkeypatch.setenv("MODEL_REPO_URL", (tmp_path / "nowhere.git").as_uri())
    at = AppTest.from_file(str(app / "app.py"), default_timeout=300).run()
    assert not at.exception and "failed" in at.error[0].value and "check the URL" in at.error[0].value
    assert len(at.chat_input) == 0


# ---------------------------------------------------------------- with the course's fine-tuned model
def test_course_app_answers_the_identity_question(course_work, tmp_path, monkeypatch):
    without_model_settings(monkeypatch)
    pushed_commit = json.loads(course_work.result("06_publish").read_text())["commit"]
    app = deploy_copy(course_work.app, tmp_path / "deployed")
    at = _chat(app / "app.py", "请你介绍一下你自己")
    assert IDENTITY in at.chat_message[1].markdown[0].value
    assert pushed_commit[:12] in at.caption[-1].value


def test_deployed_app_in_a_real_browser(course_work, tmp_path, streamlit_server, chat_in_browser):
    app = deploy_copy(course_work.app, tmp_path / "deployed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_")}
    url = streamlit_server(["streamlit", "run", "app.py", "--server.headless", "true", "--server.port", "{port}",
                            "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"], cwd=app, env=env)
    assert not (app / "model_cache").exists()  # nothing fetched before the first visit
    chat_in_browser(url, "请你介绍一下你自己", IDENTITY, "app_bundle_chat.png")
    assert (app / "model_cache" / "model" / "config.json").exists()  # fetched on this first start


# ---------------------------------------------------------------- what a first start reads, says and answers with
SYSTEM = "You are a helpful assistant."  # a prompt that changes the tiny model's answer (asserted below)


def test_fetch_reads_only_the_first_bytes_of_each_weight_file(tmp_path):
    """Whether a fetched LFS file is still a pointer is told by its first bytes: fetching 32 MiB of weights holds
    far less memory than one copy of them."""
    import tracemalloc

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text("{}")
    (repo / "model.safetensors").write_bytes(os.urandom(32 * 2**20))
    (repo / ".gitattributes").write_text(publish.gitattributes())
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    publish.push_folder(repo, remote.as_uri())
    fetch = load_module(publish.TEMPLATES / "fetch_model.py")
    tracemalloc.start()
    try:
        model = fetch.fetch_model(remote.as_uri(), tmp_path / "cache")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (model / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB held to fetch 32 MiB of weights"


def test_app_answers_with_the_system_prompt_the_model_was_trained_with(tiny_model_dir, tmp_path, monkeypatch):
    from helpers.chat import load_chat_model
    from helpers.generation import generate_answers

    for name in ("MODEL_REPO_URL", "MODEL_REVISION", "MODEL_CACHE_DIR", "MODEL_SYSTEM_PROMPT"):
        monkeypatch.delenv(name, raising=False)
    w = make_work(tmp_path / "work")
    w.adapter.mkdir(parents=True)
    (w.adapter / "training_record.json").write_text(json.dumps({"hyper_parameters": {"system": SYSTEM}}))
    # merged before merge recorded the prompt: the adapter says it
    verified_final_model(tiny_model_dir, w.final_model, adapter=w.adapter)
    repo = publish.build_model_repo(w, "m")
    assert json.loads((repo / "chat_defaults.json").read_text()) == {"system": SYSTEM}
    url = publish.default_remote(w)
    publish.push_model_repo(w, url)
    publish.build_app_bundle(w, url)
    assert json.loads((w.app / "app_config.json").read_text())["system"] == SYSTEM
    model, tokenizer = load_chat_model(w.final_model)
    course, bare = (generate_answers(model, tokenizer, ["你是谁"], system=s, max_new_tokens=256)[0] for s in (SYSTEM, ""))
    assert course != bare  # the served answer tells which prompt it had
    app = deploy_copy(w.app, tmp_path / "deployed")
    at = _chat(app / "app.py", "你是谁")
    assert at.sidebar.text_area[0].value == SYSTEM
    assert at.chat_message[1].markdown[0].value.strip() == course


def test_app_shows_a_generation_error_and_keeps_it_out_of_the_history(pushed, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest
    from transformers.generation.utils import GenerationMixin

    w, _, _ = pushed
    without_model_settings(monkeypatch)
    app = deploy_copy(w.app, tmp_path / "deployed")
    at = AppTest.from_file(str(app / "app.py"), default_timeout=600).run()

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GenerationMixin, "generate", out_of_memory)
    at.chat_input[0].set_value("你是谁").run()
    assert not at.exception and len(at.error) == 1
    assert at.error[0].value.startswith("The model could not answer (RuntimeError: CUDA out of memory.")
    assert at.session_state["history"] == []


# ---------------------------------------------------------------- the build as a platform runs it, timed
FRESH_VENV_CHAT = """
import json, sys
from streamlit.testing.v1 import AppTest

at = AppTest.from_file("app.py", default_timeout=600).run()
if at.chat_input:
    at.chat_input[0].set_value(sys.argv[1]).run()
print(json.dumps({"problems": [e.value for e in at.error] + [str(e.value) for e in at.exception],
                  "title": at.title[0].value if at.title else None,
                  "caption": at.caption[-1].value if at.caption else None,
                  "answer": at.chat_message[1].markdown[0].value if len(at.chat_message) > 1 else None},
                 ensure_ascii=False))
"""


def test_the_app_installs_into_a_fresh_venv_starts_and_answers(pushed, tmp_path, artifacts_dir):
    """What a platform does: a new virtual environment, `pip install -r requirements.txt`, then the app, which
    fetches the model, names the commit it serves and answers. The install is timed; the figure the README gives
    (helpers/templates/app_install.json) is this test's measurement, which it writes to test-artifacts/."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.generation import generate_answers

    w, _, result = pushed
    app = deploy_copy(w.app, tmp_path / "deployed")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    start = time.monotonic()
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", "requirements.txt"], cwd=app,
                         capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - start
    assert pip.returncode == 0, pip.stderr[-2000:]
    measured = {"seconds": round(seconds), "where": f"{os.cpu_count()} cores, Python {sys.version_info.major}."
                f"{sys.version_info.minor}, packages from the machine's own package index"}
    (artifacts_dir / "app_install.json").write_text(json.dumps(measured) + "\n", encoding="utf-8")
    print(f"\napp install into a fresh venv: {seconds:.0f} s")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "PYTHON", "VIRTUAL_ENV"))}
    ran = subprocess.run([str(venv / "bin" / "python"), "-c", FRESH_VENV_CHAT, "请你介绍一下你自己"], cwd=app, env=env,
                         capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr[-2000:]
    page = json.loads(ran.stdout.strip().splitlines()[-1])
    assert page["problems"] == [] and page["title"] == "测试助手"
    assert f"serving commit {result.commit[:12]}" in page["caption"]
    model = AutoModelForCausalLM.from_pretrained(w.final_model)
    expected = generate_answers(model, AutoTokenizer.from_pretrained(w.final_model), ["请你介绍一下你自己"])[0]
    assert page["answer"].strip() == expected
    readme = (app / "README.md").read_text(encoding="utf-8")
    recorded = json.loads(publish.APP_INSTALL.read_text(encoding="utf-8"))
    assert f"took {recorded['seconds']} s ({recorded['where']})" in readme
    assert "## When a build hangs or fails" in readme and "pointer files" in readme and "serving commit" in readme
