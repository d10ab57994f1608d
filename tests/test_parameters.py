"""Parameters as people write them (-p, parameter files, class CSV cells), and one sentence for a wrong one."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers.data import DataError, make_dataset
from helpers.parameters import ParameterError, parse_value, read_params_file
from helpers.publish import PublishError, build_app_bundle, build_model_repo
from helpers.runner import _typed
from helpers.train import TrainConfig, TrainConfigError


@pytest.mark.parametrize("text, value", [
    ("2e-4", 2e-4), ("1e-3", 1e-3), (".5", 0.5), ("1E3", 1000.0), ("-2.5e-1", -0.25), ("10", 10), ("0.03", 0.03),
    ("true", True), ("None", None), ("null", None), ("[2e-4, 1]", [2e-4, 1]), ("all-linear", "all-linear"),
    ('"2e-4"', "2e-4"), ("abc", "abc"), ("小明", "小明"),
])
def test_values_read_as_people_write_them(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_a_declared_string_stays_text_and_a_class_csv_cell_is_a_number():
    assert _typed("1e3", "str") == "1e3"          # name = "1e3" is a name
    assert _typed("2e-4", "None") == 2e-4         # lr = None in notebook 02: -p lr 2e-4, or a CSV cell 2e-4
    assert _typed(".5", "float") == 0.5


def test_parameter_file_numbers_and_a_malformed_line(tmp_path):
    good = tmp_path / "params.yaml"
    good.write_text("lr: 2e-4\nwarmup_ratio: .03\nname: 小明\nmax_steps: 300\n", encoding="utf-8")
    assert read_params_file(good) == {"lr": 2e-4, "warmup_ratio": 0.03, "name": "小明", "max_steps": 300}
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 2e-4\nname: [小明\nrepeats: 10\n", encoding="utf-8")
    with pytest.raises(ParameterError) as err:
        read_params_file(bad)
    assert str(err.value).startswith(f"{bad}: line ") and "\n" not in str(err.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- lr\n- 2e-4\n")
    with pytest.raises(ParameterError, match="mapping of NAME: VALUE"):
        read_params_file(listed)


def test_the_runner_refuses_a_malformed_parameter_file_in_one_sentence(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 2e-4\n  name: x\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "helpers", "run", "--work-dir", str(tmp_path / "w"), "-f", str(bad)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {bad}: line 2:") and r.stderr.count("\n") == 1
    assert not (tmp_path / "w" / "executed").exists()


@pytest.mark.parametrize("knob, value, words", [
    ("lr", "abc", "lr is 'abc' (str); use a number"),
    ("lr", "2e-4", "lr is '2e-4' (str); use a number"),
    ("lr", 0, "lr is 0; use a number above 0"),
    ("max_length", 2.5, "max_length is 2.5 (float); use a whole number"),
    ("batch_size", 0, "batch_size is 0; use a whole number at least 1"),
    ("pack_to_max_length", "yes", "pack_to_max_length is 'yes' (str); use True or False"),
    ("lora_dropout", 1.0, "lora_dropout is 1.0; use a number at least 0 and below 1"),
    ("warmup_ratio", -0.1, "warmup_ratio is -0.1"),
    ("target_modules", ["q_proj", 3], "target_modules[1] is 3 (int)"),
    ("evaluation_inputs", "你是谁", "evaluation_inputs is '你是谁' (str); use a list"),
    ("max_steps", True, "max_steps is True (bool); use a whole number"),
    ("quantization", "int8", "quantization is 'int8'; use one of 'auto', 'nf4', 'none'"),
    ("seed", "0", "seed is '0' (str)"),
])
def test_training_knobs_are_checked_in_one_sentence(knob, value, words):
    with pytest.raises(TrainConfigError) as err:
        TrainConfig(**{knob: value}).resolved()
    assert str(err.value).startswith(words) and "\n" not in str(err.value)


def test_good_training_knobs_pass_and_whole_numbers_count_as_numbers():
    cfg = TrainConfig(lr=1, warmup_ratio=0, lora_alpha=16, epochs=2, target_modules=["q_proj"]).resolved()
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.lora_alpha == 16 and cfg.epochs == 2


@pytest.mark.parametrize("kwargs, words", [
    ({"repeats": "10"}, "repeats is '10' (str); use a whole number"),
    ({"repeats": 0}, "repeats is 0; use a whole number at least 1"),
    ({"name": 7}, "name is 7 (int); use text in quotes"),
    ({"questions": "你是谁"}, "questions is '你是谁' (str); use a list"),
    ({"questions": ["a", None]}, "questions[1] is None"),
    ({"general_ratio": "0.2"}, "general_ratio is '0.2' (str); use a number"),
    ({"system": None}, "system is None"),
])
def test_data_settings_are_checked_in_one_sentence(tmp_path, kwargs, words):
    with pytest.raises(DataError) as err:
        make_dataset(tmp_path / "d.json", **kwargs)
    assert str(err.value).startswith(words)
    assert not (tmp_path / "d.json").exists()


def test_publish_settings_are_checked_in_one_sentence(tmp_path):
    from helpers.paths import work as make_work

    w = make_work(tmp_path / "w")
    with pytest.raises(PublishError, match=r"^model_name is 3 \(int\); use text in quotes"):
        build_model_repo(w, 3)
    with pytest.raises(PublishError, match=r"^remote_url is 5 \(int\); give the git URL as text"):
        build_app_bundle(w, 5)
    with pytest.raises(PublishError, match=r"^app_title is \['a'\] \(list\)"):
        build_app_bundle(w, "file:///tmp/x.git", title=["a"])
    assert not w.app.exists() and not w.model_repo.exists()
