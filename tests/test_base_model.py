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


def test_hub_id_is_recorded(tmp_path):
    w = work(tmp_path / "w")
    prepare_base_model("Qwen/Qwen2.5-0.5B-Instruct", w)
    assert base_model_path(w) == "Qwen/Qwen2.5-0.5B-Instruct"


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
