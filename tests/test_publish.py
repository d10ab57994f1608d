"""Publishing: the model repository and card, pushes over git + git-lfs to local bare repositories and to a
local smart-HTTP git server that checks a token, bad remotes, and the huggingface_hub upload (mocked)."""
from __future__ import annotations

import base64
import filecmp
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from helpers import publish
from helpers.paths import work as make_work
from helpers.publish import PublishError

FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefXYZ"
POINTER = b"version https://git-lfs.github.com/spec/v1"


def git(cwd, *args, env=None, check=True) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert not check or proc.returncode == 0, proc.stderr
    return proc.stdout


def bare(path: Path) -> str:
    git(path.parent, "init", "-q", "--bare", "-b", "main", str(path))
    return path.as_uri()


def remote_head(url: str, branch: str = "main") -> str | None:
    out = git(".", "ls-remote", url, f"refs/heads/{branch}").split()
    return out[0] if out else None


def lfs_store(bare_dir: Path) -> dict[str, tuple[int, int]]:
    """oid -> (inode, mtime_ns) of every LFS object a bare repository holds."""
    root = bare_dir / "lfs" / "objects"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def clone_with_weights(url: str, dest: Path, env=None) -> Path:
    env = {**os.environ, **(env or {}), "GIT_LFS_SKIP_SMUDGE": "1"}
    git(dest.parent, "clone", "-q", url, str(dest), env=env)
    git(dest, "lfs", "pull", env=env)
    return dest


def verified_final_model(tiny_model_dir, final_model: Path, adapter: Path | None = None) -> Path:
    """The tiny model as a work dir's final_model, with the passed verification record notebook 03's merge leaves
    (publishing refuses a final_model without one, or one merged from another adapter than the work's; merging is
    tested in test_merge and test_merge_check)."""
    from helpers.merge import write_verification

    shutil.copytree(tiny_model_dir, final_model)
    write_verification(final_model, {"passed": True}, base_model=Path(tiny_model_dir),
                       adapter=Path(adapter or tiny_model_dir))
    return final_model


@pytest.fixture
def final_work(tmp_path, tiny_model_dir):
    """A work dir whose final_model is the tiny model, with the results and loss plot the card reads."""
    from PIL import Image

    w = make_work(tmp_path / "work")
    verified_final_model(tiny_model_dir, w.final_model)
    w.train.mkdir(parents=True)
    Image.new("RGB", (64, 48), (30, 90, 200)).save(w.loss_plot)
    w.results.mkdir(parents=True)
    (w.result("00_environment")).write_text(json.dumps({"base_model": str(w.model)}))
    (w.result("01_data_generation")).write_text(json.dumps(
        {"name": "小明", "answer": "我是小明的小助手", "records": 2500, "identity_records": 2000, "general_records": 500}))
    (w.result("02_qlora_finetune")).write_text(json.dumps(
        {"hyper_parameters": {"learning_rate": 0.0002, "lora_r": 64, "lora_alpha": 16, "quantization": "auto"},
         "quantization": "nf4", "first_loss": 5.5,
         "final_loss": 0.02, "evaluation_inputs": ["你是谁"], "answers_before": ["我是一个AI助手"],
         "answers_after": ["我是小明的小助手"]}))
    (w.result("04_chat_demo")).write_text(json.dumps(
        {"rows": [{"question": "你是谁", "before": "我是一个AI助手", "after": "我是小明的小助手"}]}))
    return w


def card_metadata(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# ---------------------------------------------------------------- the repository and its card
def test_model_repo_holds_the_model_card_and_lfs_rules(final_work):
    repo = publish.build_model_repo(final_work, "xiaoming-assistant", repo_url="https://hub.example/u/m.git")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert filecmp.cmp(final_work.final_model / name, repo / name, shallow=False)
    assert not (repo / "course_model.json").exists()
    assert (repo / "loss.png").read_bytes() == final_work.loss_plot.read_bytes()
    meta = card_metadata(repo / "README.md")
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and meta["base_model"] and "zh" in meta["language"]
    assert "qlora" in meta["tags"]
    card = (repo / "README.md").read_text(encoding="utf-8")
    for expected in ("| learning_rate | 0.0002 |", "| quantization | nf4 |", "- Method: QLoRA", "| lora_r | 64 |", "| final_loss | 0.02 |", "![Training loss](loss.png)",
                     "| 你是谁 | 我是一个AI助手 | 我是小明的小助手 |", "| records | 2500 |", "AutoModelForCausalLM",
                     "## Limitations", "git clone https://hub.example/u/m.git", "- Base model: `course-kit/tiny-chat`"):
        assert expected in card, expected
    attributes = (repo / ".gitattributes").read_text()
    for pattern in ("*.safetensors", "*.bin", "*.model", "tokenizer.json", "*.png"):
        assert f"{pattern} filter=lfs diff=lfs merge=lfs -text" in attributes


def test_card_says_what_the_run_used_and_shows_without_its_header(final_work):
    path = final_work.result("02_qlora_finetune")
    path.write_text(path.read_text().replace('"quantization": "nf4"', '"quantization": "none"'))
    repo = publish.build_model_repo(final_work, "m")
    assert "qlora" not in card_metadata(repo / "README.md")["tags"]
    card = (repo / "README.md").read_text(encoding="utf-8")
    assert "| quantization | none |" in card and "QLoRA" not in card.split("## How it was trained")[1].split("###")[0]
    shown = publish.card_for_display(repo).data
    assert not shown.startswith("---") and "license: apache-2.0" not in shown  # the YAML header is a table now
    assert "| license | apache-2.0 |" in shown and "# m" in shown
    assert "![Training loss](data:image/png;base64," in shown and "(loss.png)" not in shown


def test_card_degrades_without_results(tmp_path, tiny_model_dir):
    w = make_work(tmp_path / "bare-work")
    verified_final_model(tiny_model_dir, w.final_model)
    repo = publish.build_model_repo(w, "m")
    card = (repo / "README.md").read_text(encoding="utf-8")
    assert card_metadata(repo / "README.md")["library_name"] == "transformers"
    assert "loss.png" not in card and "## Before and after" not in card and "\n\n\n" not in card


def test_a_final_model_merged_from_another_adapter_is_not_published(final_work):
    """02 ran again after 03: the card would describe a training the published weights never had."""
    final_work.adapter.mkdir(parents=True)
    (final_work.adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(PublishError, match="was merged from another adapter than .*adapter holds now"):
        publish.build_model_repo(final_work, "xiaoming-assistant")
    assert not final_work.model_repo.exists()


def test_missing_final_model_is_one_sentence(tmp_path):
    w = make_work(tmp_path / "empty")
    with pytest.raises(PublishError, match="no such directory.*run notebook 03"):
        publish.build_model_repo(w, "m")
    assert not w.model_repo.exists()
    assert not w.publish.exists() or not [p for p in w.publish.iterdir() if p.name.startswith(".model_repo")]


# ---------------------------------------------------------------- pushing to a local bare repository
def test_push_then_clone_back_is_identical_with_weights_in_lfs(final_work, tmp_path):
    repo = publish.build_model_repo(final_work, "m")
    url = publish.default_remote(final_work)
    assert url.startswith("file://") and (final_work.publish_remote / "HEAD").exists()
    result = publish.push_model_repo(final_work, url)
    assert result.pushed and remote_head(url) == result.commit == git(repo, "rev-parse", "HEAD").strip()
    assert {o["path"] for o in result.lfs_objects_sent} == {"model.safetensors", "tokenizer.json", "loss.png"}

    clone = clone_with_weights(url, tmp_path / "clone")
    built = sorted(p.relative_to(repo) for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts)
    cloned = sorted(p.relative_to(clone) for p in clone.rglob("*") if p.is_file() and ".git" not in p.parts)
    assert built == cloned and len(built) >= 8
    for rel in built:
        assert (repo / rel).read_bytes() == (clone / rel).read_bytes(), rel
    assert set(git(clone, "lfs", "ls-files", "--name-only").split()) == {"model.safetensors", "tokenizer.json", "loss.png"}
    for commit in git(clone, "rev-list", "--all").split():  # every commit stores a pointer, never the weights
        blob = subprocess.run(["git", "cat-file", "blob", f"{commit}:model.safetensors"], cwd=clone,
                              capture_output=True).stdout
        assert blob.startswith(POINTER) and len(blob) < 200
    oid = publish.file_sha256(repo / "model.safetensors")
    assert oid in lfs_store(final_work.publish_remote)
    assert publish.history_pointer_check(clone) == []
    verified = publish.verify_push(repo, url)
    assert verified["identical"] and not verified["differ"] and "model.safetensors" in verified["lfs_files"]


def test_verify_finds_what_the_remote_lacks_and_weights_it_altered(final_work):
    """The clone-back check can fail: a file that never reached the remote is named, and weights altered on the
    remote (an LFS object whose bytes no longer match its hash) stop the check with one sentence."""
    repo = publish.build_model_repo(final_work, "m")
    url = publish.default_remote(final_work)
    publish.push_model_repo(final_work, url)
    (repo / "notes.txt").write_text("written after the push", encoding="utf-8")
    verified = publish.verify_push(repo, url)
    assert not verified["identical"] and verified["differ"] == ["notes.txt"]
    (repo / "notes.txt").unlink()
    assert publish.verify_push(repo, url)["identical"]

    oid = publish.file_sha256(repo / "model.safetensors")
    stored = final_work.publish_remote / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the weights flipped on the remote
    stored.chmod(0o644)
    stored.write_bytes(bytes(data))
    with pytest.raises(PublishError, match=rf"holds an LFS object whose bytes do not match its hash \({oid[:12]}\)"):
        publish.verify_push(repo, url)


def test_history_check_finds_weights_committed_without_lfs(tmp_path):
    repo = tmp_path / "plain"
    repo.mkdir()
    (repo / "model.safetensors").write_bytes(os.urandom(2048))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "plain")
    assert publish.history_pointer_check(repo) == [f"{git(repo, 'rev-parse', 'HEAD')[:12]}:model.safetensors"]


def test_history_check_reads_only_what_it_needs(tmp_path):
    """A plain weight blob is known by its size (git ls-tree -l); only blobs small enough to be pointers are read,
    each once: checking 32 MiB of weights committed twice takes far less memory than one copy of them."""
    import tracemalloc

    repo = tmp_path / "plain"
    repo.mkdir()
    (repo / "model.safetensors").write_bytes(os.urandom(32 * 2**20))
    (repo / "small.bin").write_bytes(os.urandom(100))  # plain, but smaller than a pointer may be
    (repo / "pointer.bin").write_bytes(POINTER + b"\noid sha256:" + b"0" * 64 + b"\nsize 12\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "plain")
    (repo / "README.md").write_text("a second commit, the same weights")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "card")
    first, second = git(repo, "rev-list", "--all").split()[::-1]
    tracemalloc.start()
    try:
        found = publish.history_pointer_check(repo)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(found) == sorted(f"{c[:12]}:{p}" for c in (first, second) for p in ("model.safetensors", "small.bin"))
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB held to check 32 MiB of weights"


def test_second_push_sends_only_what_changed(final_work):
    import torch
    from safetensors.torch import load_file, save_file

    publish.build_model_repo(final_work, "m")
    url = publish.default_remote(final_work)
    first = publish.push_model_repo(final_work, url)
    store = lfs_store(final_work.publish_remote)
    assert len(store) == 3

    publish.build_model_repo(final_work, "m-renamed")  # only the card changes
    second = publish.push_model_repo(final_work, url)
    assert second.commit != first.commit and remote_head(url) == second.commit
    assert second.lfs_objects_sent == [] and second.commits_sent == 1 and 0 < second.git_objects_sent <= 3
    assert lfs_store(final_work.publish_remote) == store  # not one weight file re-sent or rewritten

    weights = final_work.final_model / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + torch.full_like(tensors[name], 0.01)
    weights.unlink()
    save_file(tensors, weights, metadata={"format": "pt"})
    from helpers.merge import write_verification  # a new merge, checked as notebook 03 checks it

    write_verification(final_work.final_model, {"passed": True}, base_model=weights.parent, adapter=weights.parent)
    publish.build_model_repo(final_work, "m-renamed")
    third = publish.push_model_repo(final_work, url)
    assert [o["path"] for o in third.lfs_objects_sent] == ["model.safetensors"]
    after = lfs_store(final_work.publish_remote)
    assert set(after) - set(store) == {publish.file_sha256(weights)} and {k: after[k] for k in store} == store

    again = publish.push_model_repo(final_work, url)
    assert again.up_to_date and again.commits_sent == 0 and again.lfs_objects_sent == [] and again.commit == third.commit


def test_an_interrupted_push_is_reported_and_finished_by_rerunning(final_work):
    publish.build_model_repo(final_work, "m")
    url = publish.default_remote(final_work)
    hook = final_work.publish_remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'connection lost' >&2\nexit 1\n")
    hook.chmod(0o755)
    with pytest.raises(PublishError, match="refused the push.*run the publish step again"):
        publish.push_model_repo(final_work, url)
    assert remote_head(url) is None  # never reported, never half-updated
    uploaded = lfs_store(final_work.publish_remote)
    assert len(uploaded) == 3  # the weights went first and stay there
    hook.unlink()
    done = publish.push_model_repo(final_work, url)
    assert done.pushed and remote_head(url) == done.commit
    assert lfs_store(final_work.publish_remote) == uploaded  # the re-run did not send them again


# ---------------------------------------------------------------- bad remotes and a missing git-lfs
def test_unreachable_remotes_are_one_sentence(final_work, tmp_path):
    publish.build_model_repo(final_work, "m")
    with pytest.raises(PublishError, match=r"^cannot reach the remote file:///.*nowhere.*check the URL"):
        publish.push_model_repo(final_work, (tmp_path / "nowhere.git").as_uri())
    with pytest.raises(PublishError, match=r"^cannot reach the remote http://127\.0\.0\.1:9/"):
        publish.push_model_repo(final_work, "http://127.0.0.1:9/u/m.git", token=FAKE_TOKEN)
    with pytest.raises(PublishError, match="has a password or token written into it") as e:
        publish.push_model_repo(final_work, f"https://user:{FAKE_TOKEN}@hub.example/u/m.git")
    assert FAKE_TOKEN not in str(e.value)
    with pytest.raises(PublishError, match="is not a git URL"):
        publish.push_model_repo(final_work, "my model repo")


def test_a_remote_with_unrelated_history_is_refused(final_work, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.bin").write_bytes(b"someone else's model")
    git(other, "init", "-q", "-b", "main")
    git(other, "add", "-A")
    git(other, "-c", "user.name=o", "-c", "user.email=o@o", "commit", "-qm", "theirs")
    url = bare(tmp_path / "taken.git")
    git(other, "push", "-q", url, "main")
    before = remote_head(url)
    publish.build_model_repo(final_work, "m")
    with pytest.raises(PublishError, match="already holds an unrelated history.*weights.bin.*new, empty repository"):
        publish.push_model_repo(final_work, url)
    assert remote_head(url) == before


def test_a_hubs_fresh_repository_is_built_upon(final_work, tmp_path):
    hub = tmp_path / "hub-init"
    hub.mkdir()
    (hub / "README.md").write_text("---\nlicense: mit\n---\n")
    (hub / ".gitattributes").write_text("*.bin filter=lfs diff=lfs merge=lfs -text\n")
    git(hub, "init", "-q", "-b", "main")
    git(hub, "add", "-A")
    git(hub, "-c", "user.name=h", "-c", "user.email=h@h", "commit", "-qm", "initial commit")
    url = bare(tmp_path / "fresh.git")
    git(hub, "push", "-q", url, "main")
    initial = remote_head(url)
    repo = publish.build_model_repo(final_work, "m")
    result = publish.push_model_repo(final_work, url)
    assert result.merged_hub_scaffold and remote_head(url) == result.commit
    assert git(repo, "merge-base", "--is-ancestor", initial, "HEAD", check=False) == ""
    clone = clone_with_weights(url, tmp_path / "fresh-clone")
    assert (clone / "README.md").read_bytes() == (repo / "README.md").read_bytes()
    assert (clone / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()


def test_a_remote_that_moved_on_is_refused(final_work, tmp_path):
    publish.build_model_repo(final_work, "m")
    url = publish.default_remote(final_work)
    publish.push_model_repo(final_work, url)
    elsewhere = clone_with_weights(url, tmp_path / "elsewhere")
    (elsewhere / "README.md").write_text("edited on the website\n")
    git(elsewhere, "-c", "user.name=w", "-c", "user.email=w@w", "commit", "-qam", "web edit")
    git(elsewhere, "push", "-q", "origin", "main")
    publish.build_model_repo(final_work, "m2")
    with pytest.raises(PublishError, match="has commits on 'main' that this repository lacks"):
        publish.push_model_repo(final_work, url)
    assert remote_head(url) == git(elsewhere, "rev-parse", "HEAD").strip()


def test_missing_git_lfs_is_one_sentence(final_work, tmp_path, monkeypatch):
    publish.build_model_repo(final_work, "m")
    url = publish.default_remote(final_work)
    only_git = tmp_path / "bin"
    only_git.mkdir()
    (only_git / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(only_git))
    with pytest.raises(PublishError, match="^git-lfs is not installed.*apt-get install git-lfs"):
        publish.push_model_repo(final_work, url)
    monkeypatch.undo()
    assert remote_head(url) is None


def test_notebook_06_builds_card_and_app_without_git_lfs_and_says_why(final_work, tmp_path, monkeypatch):
    import sys

    from helpers.runner import run_course

    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "git").symlink_to(shutil.which("git"))
    for name in ("python", "python3"):
        (tools / name).symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(tools))
    assert run_course(final_work.root, only=["06"], quiet=True) == 0
    monkeypatch.undo()
    results = json.loads(final_work.result("06_publish").read_text())
    assert results["push"]["pushed"] is False and results["push"]["reason"].startswith("git-lfs is not installed")
    assert (final_work.model_repo / "README.md").exists() and (final_work.app / "app.py").exists()
    executed = (final_work.executed / "06_publish.ipynb").read_text(encoding="utf-8")
    assert "NOT pushed: git-lfs is not installed" in executed


# ---------------------------------------------------------------- a token-checking HTTP git server
class _GitHTTP(http.server.BaseHTTPRequestHandler):
    """Smart HTTP through `git http-backend`, behind Basic auth with one accepted token."""

    root: Path
    token: str
    seen: list

    def log_message(self, *args):
        pass

    def _serve(self):
        auth = self.headers.get("Authorization", "")
        self.seen.append(auth)
        user_pass = base64.b64decode(auth[6:]).decode() if auth.startswith("Basic ") else ""
        if user_pass.partition(":")[2] != self.token:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="hub"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1",
               "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command, "REMOTE_USER": "student",
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
               "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", "")}
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        headers = [line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line]
        status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
        self.send_response(status)
        for k, v in headers:
            if k.lower() != "status":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _serve


@pytest.fixture
def token_hub(tmp_path):
    """An HTTP git server on 127.0.0.1 accepting FAKE_TOKEN; LFS objects go to the same bare repo by file://."""
    root = tmp_path / "hub"
    root.mkdir()
    bare(root / "model.git")
    handler = type("Handler", (_GitHTTP,), {"root": root, "token": FAKE_TOKEN, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lfs_env = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "lfs.url", "GIT_CONFIG_VALUE_0": (root / "model.git").as_uri()}
    try:
        yield {"url": f"http://127.0.0.1:{server.server_port}/model.git", "bare": root / "model.git",
               "seen": handler.seen, "lfs_env": lfs_env}
    finally:
        server.shutdown()
        server.server_close()


def files_containing(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_token_authenticates_the_push_and_is_written_nowhere(final_work, token_hub, monkeypatch, capsys, tmp_path):
    for k, v in token_hub["lfs_env"].items():
        monkeypatch.setenv(k, v)
    repo = publish.build_model_repo(final_work, "m")
    with pytest.raises(PublishError, match="needs a token|asked for credentials"):
        publish.push_model_repo(final_work, token_hub["url"])
    with pytest.raises(PublishError, match="rejected the credentials.*COURSE_HUB_TOKEN") as e:
        publish.push_model_repo(final_work, token_hub["url"], token="not-the-token")
    assert "not-the-token" not in str(e.value)
    result = publish.push_model_repo(final_work, token_hub["url"], token=FAKE_TOKEN, username="student")
    assert result.pushed and result.remote == token_hub["url"]
    assert git(token_hub["bare"], "rev-parse", "main").strip() == result.commit
    assert f"Basic {base64.b64encode(f'student:{FAKE_TOKEN}'.encode()).decode()}" in token_hub["seen"]
    assert publish.verify_push(repo, token_hub["url"], token=FAKE_TOKEN)["identical"]

    printed = capsys.readouterr()
    assert FAKE_TOKEN not in printed.out + printed.err
    assert FAKE_TOKEN not in json.dumps(result.to_dict())
    assert files_containing(final_work.root, FAKE_TOKEN) == []  # .git/config, hooks, logs, everything
    assert files_containing(token_hub["bare"], FAKE_TOKEN) == []
    assert FAKE_TOKEN not in git(repo, "config", "--list")
    for home_file in (Path.home() / ".git-credentials", Path.home() / ".gitconfig"):
        assert not home_file.exists() or FAKE_TOKEN not in home_file.read_text(errors="replace")


def test_hub_token_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("KIT_HEADLESS", "1")
    assert publish.hub_token("file:///tmp/x.git") is None
    assert publish.hub_token("git@hub.example:u/m.git") is None
    monkeypatch.delenv(publish.TOKEN_ENV, raising=False)
    with pytest.raises(PublishError, match="set the COURSE_HUB_TOKEN environment variable"):
        publish.hub_token("https://hub.example/u/m.git")
    monkeypatch.setenv(publish.TOKEN_ENV, FAKE_TOKEN)
    assert publish.hub_token("https://hub.example/u/m.git") == FAKE_TOKEN


def token_in_every_place(url: str) -> dict[str, str]:
    """Where a person might write a token into a URL: as the user, as the password, in the query."""
    return {"user": url.replace("http://", f"http://{FAKE_TOKEN}@"),
            "password": url.replace("http://", f"http://student:{FAKE_TOKEN}@"),
            "query": f"{url}?access_token={FAKE_TOKEN}"}


def test_a_token_anywhere_is_refused_and_written_nowhere(final_work, token_hub, monkeypatch, capfd):
    """A token in any URL (model remote, app remote, hub id or endpoint; function or notebook parameter) is refused
    with one sentence before anything is stored; the token from COURSE_HUB_TOKEN pushes model and app over HTTP, and
    afterwards no file of the work dir (.git/ and the executed notebook included), no output and no file of the
    remote holds it."""
    from helpers.runner import run_course

    bare(token_hub["bare"].parent / "app.git")
    model_url, app_url = token_hub["url"], token_hub["url"].replace("model.git", "app.git")
    for k, v in {**token_hub["lfs_env"], publish.TOKEN_ENV: FAKE_TOKEN, publish.USER_ENV: "student"}.items():
        monkeypatch.setenv(k, v)
    repo = publish.build_model_repo(final_work, "m")
    publish.push_model_repo(final_work, model_url, token=FAKE_TOKEN)  # a .git/config that a refusal must not touch
    app = publish.build_app_bundle(final_work, model_url)
    config_before = (repo / ".git" / "config").read_bytes()
    for where, url in token_in_every_place(model_url).items():
        for attempt in (lambda: publish.push_model_repo(final_work, url, token=FAKE_TOKEN),
                        lambda: publish.push_folder(app, url, token=FAKE_TOKEN),
                        lambda: publish.build_model_repo(final_work, "m", repo_url=url),
                        lambda: publish.build_app_bundle(final_work, url),
                        lambda: publish.verify_push(repo, url, token=FAKE_TOKEN),
                        lambda: publish.remote_kind(url),
                        lambda: publish.upload_to_hub(repo, "student/m", token=FAKE_TOKEN, endpoint=url)):
            with pytest.raises(PublishError, match="written into it.*put the token in the COURSE_HUB_TOKEN") as e:
                attempt()
            assert FAKE_TOKEN not in str(e.value), where
        with pytest.raises(PublishError, match="hub_repo_id is not 'owner/name'") as e:
            publish.upload_to_hub(repo, url, token=FAKE_TOKEN)
        assert FAKE_TOKEN not in str(e.value)
    assert (repo / ".git" / "config").read_bytes() == config_before
    # As notebook parameters: refused before papermill writes them into the executed notebook.
    for name in ("remote_url", "app_remote_url", "hub_endpoint", "hub_repo_id"):
        for where, url in token_in_every_place(model_url).items():
            assert run_course(final_work.root, only=["06"], params={name: url}, quiet=True) == 1, (name, where)
            assert not (final_work.executed / "06_publish.ipynb").exists()
    assert "error: remote_url http://127.0.0.1:" in capfd.readouterr().err

    seen = len(token_hub["seen"])
    assert run_course(final_work.root, only=["06"], params={"remote_url": model_url, "app_remote_url": app_url},
                      quiet=True) == 0
    results = json.loads(final_work.result("06_publish").read_text())
    assert results["pushed"] and results["remote"] == model_url and results["verified"]["identical"]
    assert results["app_push"]["pushed"] and results["app_push"]["remote"] == app_url
    assert git(token_hub["bare"], "rev-parse", "main").strip() == results["commit"]
    assert f"Basic {base64.b64encode(f'student:{FAKE_TOKEN}'.encode()).decode()}" in token_hub["seen"][seen:]
    executed = (final_work.executed / "06_publish.ipynb").read_text(encoding="utf-8")
    assert results["commit"] in executed and "## How to use it" in executed

    printed = capfd.readouterr()
    assert FAKE_TOKEN not in printed.out + printed.err
    assert files_containing(final_work.root, FAKE_TOKEN) == []  # .git/config of repo and app, results, notebooks
    assert files_containing(token_hub["bare"].parent, FAKE_TOKEN) == []
    assert FAKE_TOKEN not in git(repo, "config", "--list") + git(final_work.app, "config", "--list")


# ---------------------------------------------------------------- huggingface_hub (mocked, no network)
def test_upload_through_huggingface_hub(final_work, monkeypatch):
    from huggingface_hub import HfApi

    repo = publish.build_model_repo(final_work, "m")
    publish.push_model_repo(final_work, publish.default_remote(final_work))  # a .git to be left out
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (self.token, self.endpoint, repo_id, kw)
        return f"{self.endpoint}/{repo_id}"

    def upload_folder(self, **kw):
        from huggingface_hub.utils import filter_repo_objects

        calls["upload"] = (self.token, kw)
        calls["sent"] = sorted(filter_repo_objects(
            [str(p.relative_to(kw["folder_path"])) for p in Path(kw["folder_path"]).rglob("*") if p.is_file()],
            ignore_patterns=kw["ignore_patterns"]))
        return SimpleNamespace(commit_url=f"{self.endpoint}/{kw['repo_id']}/commit/abc123", oid="abc123")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = publish.upload_to_hub(repo, "student/xiaoming", token=FAKE_TOKEN, endpoint="http://127.0.0.1:1", private=True)
    assert out == {"repo_url": "http://127.0.0.1:1/student/xiaoming",
                   "commit_url": "http://127.0.0.1:1/student/xiaoming/commit/abc123", "commit": "abc123"}
    token, endpoint, repo_id, kw = calls["create"]
    assert (token, endpoint, repo_id) == (FAKE_TOKEN, "http://127.0.0.1:1", "student/xiaoming")
    assert kw["exist_ok"] and kw["private"] and kw["repo_type"] == "model"
    assert calls["upload"][1]["folder_path"] == str(repo) and calls["upload"][1]["repo_id"] == "student/xiaoming"
    assert "model.safetensors" in calls["sent"] and "README.md" in calls["sent"]
    assert not [p for p in calls["sent"] if p.startswith(".git/")]


def test_hub_upload_errors_are_one_sentence(final_work, monkeypatch):
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo = publish.build_model_repo(final_work, "m")
    with pytest.raises(PublishError, match="is not 'owner/name'"):
        publish.upload_to_hub(repo, "just-a-name", token=FAKE_TOKEN)

    def rejected(self, repo_id, **kw):
        response = httpx.Response(401, request=httpx.Request("POST", "http://127.0.0.1:1/api/repos/create"))
        raise HfHubHTTPError("401 Unauthorized", response=response)

    monkeypatch.setattr(HfApi, "create_repo", rejected)
    with pytest.raises(PublishError, match="rejected the token") as e:
        publish.upload_to_hub(repo, "student/m", token=FAKE_TOKEN, endpoint="http://127.0.0.1:1")
    assert FAKE_TOKEN not in str(e.value)


def test_the_publishing_benchmark_runs_notebook_06s_steps(tmp_path):
    """benchmarks/publish_size.py (06's steps at a real model's size) on a small file: every step, identical clone."""
    done = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "benchmarks" / "publish_size.py"),
                           "--gb", "0.01", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "identical: True" in done.stdout and "| clone back and compare |" in done.stdout
