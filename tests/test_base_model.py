"""Base-model selection: the tiny default, a checked local directory, a hub id recorded as such."""
import json
import shutil

import pytest

from helpers.base_model import ModelPathError, base_model_path, check_model_dir, prepare_base_model
from helpers.paths import work


def test_local_directory_is_checked_and_recorded(tmp_path, tiny_model_dir):
    w = work(tmp_path / "w")
    path = prepare_base_model(str(tiny_model_dir), w)
    assert path == tiny_model_dir.resolve()
    assert json.loads(w.model.joinpath("course_model.json").read_text())["kind"] == "local"
    assert base_model_path(w) == str(tiny_model_dir.resolve())


def test_the_record_holds_the_base_models_identity_by_content(tmp_path, tiny_model_dir):
    from helpers.base_model import base_model_identity
    from helpers.fingerprint import model_identity

    expected = model_identity(tiny_model_dir, cached=False)
    w = work(tmp_path / "w")
    prepare_base_model(str(tiny_model_dir), w)
    identity = json.loads(w.model.joinpath("course_model.json").read_text())["identity"]
    assert identity["source"] == tiny_model_dir.name and identity["architecture"] == "LlamaForCausalLM"
    assert identity["content_sha256"] == expected["content_sha256"] and identity["parameters"] > 300_000
    assert set(identity["files"]) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert base_model_identity(w) == identity

    # The tiny model notebook 00 builds (here: reused, same recipe) is recorded the same way, named "tiny".
    t = work(tmp_path / "t")
    shutil.copytree(tiny_model_dir, t.model)
    prepare_base_model("tiny", t)
    record = json.loads(t.model.joinpath("course_model.json").read_text())
    assert record["kind"] == "tiny" and record["identity"]["source"] == "tiny"
    assert record["identity"]["content_sha256"] == expected["content_sha256"]

    # Weights changed in place: the same folder is another model.
    weights = t.model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert base_model_identity(t)["content_sha256"] != expected["content_sha256"]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model_dir):
    """A local Hugging Face cache (HF_HUB_CACHE) holding course/tiny-chat as a snapshot, and the hub offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--course--tiny-chat"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / commit


def test_hub_id_resolves_to_its_cached_snapshot_everywhere(tmp_path, hub_cache):
    from helpers.base_model import base_model_source, resolve_base_model

    w = work(tmp_path / "w")
    path = prepare_base_model("course/tiny-chat", w)
    assert path == hub_cache.resolve()
    record = json.loads(w.model.joinpath("course_model.json").read_text())
    identity = record.pop("identity")
    assert record == {"kind": "hub", "id": "course/tiny-chat", "path": str(hub_cache.resolve())}
    assert identity["source"] == "course/tiny-chat" and identity["path"] == str(hub_cache.resolve())
    assert base_model_path(w) == str(hub_cache.resolve())  # what 03, 04, 05 and homework load
    assert resolve_base_model("course/tiny-chat", w) == str(hub_cache.resolve())  # 02 given the same id
    assert resolve_base_model(None, w) == str(hub_cache.resolve())
    assert base_model_source(w) == "course/tiny-chat"  # the model card's base_model


def test_hub_id_offline_and_not_cached_is_one_sentence(tmp_path, hub_cache):
    with pytest.raises(ModelPathError) as err:
        prepare_base_model("Qwen/Qwen2.5-0.5B-Instruct", work(tmp_path / "w"))
    message = str(err.value)
    assert message.startswith("Qwen/Qwen2.5-0.5B-Instruct: this hub model is not in the local cache")
    assert "HF_HUB_OFFLINE=1" in message and "hf download Qwen/Qwen2.5-0.5B-Instruct" in message
    assert "folder" in message and "\n" not in message


def test_another_folder_in_02_is_prepared_and_recorded(tmp_path, tiny_model_dir):
    from helpers.base_model import resolve_base_model

    w = work(tmp_path / "w")
    prepare_base_model(str(tiny_model_dir), w)
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    assert resolve_base_model(str(other), w) == str(other.resolve()) == base_model_path(w)


def test_truncated_weights_are_one_sentence(tmp_path, tiny_model_dir):
    target = tmp_path / "m"
    shutil.copytree(tiny_model_dir, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelPathError) as err:
        prepare_base_model(str(target), work(tmp_path / "w"))
    assert str(err.value).startswith(f"{weights}: cannot be read as safetensors weights")
    assert "download it again" in str(err.value) and "\n" not in str(err.value)


def test_unreadable_tokenizer_is_one_sentence(tmp_path, tiny_model_dir):
    target = tmp_path / "m"
    shutil.copytree(tiny_model_dir, target)
    (target / "tokenizer.json").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    with pytest.raises(ModelPathError) as err:
        prepare_base_model(str(target), work(tmp_path / "w"))
    message = str(err.value)
    assert message.startswith(f"{target.resolve()}: its tokenizer (tokenizer.json, tokenizer_config.json) cannot be read")
    assert message.endswith("copy the tokenizer files from the model's repository again.") and "\n" not in message


@pytest.mark.parametrize("remove, expected", [
    (None, "no such directory"),
    ("config.json", "has no config.json"),
    ("model.safetensors", "no weights"),
    ("tokenizer.json", "no tokenizer files"),
])
def test_bad_model_dirs_get_one_sentence(tmp_path, tiny_model_dir, remove, expected):
    target = tmp_path / "m"
    if remove is not None:
        shutil.copytree(tiny_model_dir, target)
        (target / remove).unlink()
        if remove == "tokenizer.json":
            (target / "tokenizer_config.json").unlink()
    with pytest.raises(ModelPathError) as err:
        check_model_dir(target)
    assert expected in str(err.value) and str(target) in str(err.value)


def test_unprepared_work_dir_says_run_00(tmp_path):
    with pytest.raises(ModelPathError, match="run notebook 00"):
        base_model_path(work(tmp_path / "empty"))
