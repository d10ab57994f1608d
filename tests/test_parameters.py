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
    with pytest.raises(PublishError, match=r"^the app's model_repo_url is 5 \(int\); give the git URL as text"):
        build_app_bundle(w, 5)
    with pytest.raises(PublishError, match=r"^app_title is \['a'\] \(list\)"):
        build_app_bundle(w, "file:///tmp/x.git", title=["a"])
    assert not w.app.exists() and not w.model_repo.exists()


# ---------------------------------------------------------------- a misspelt or left-out -p / -f name
def helpers_command(*args):
    return subprocess.run([sys.executable, "-m", "helpers", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("wrong, meant", [("learning_rate", "lr"), ("LR", "lr"), ("repeat", "repeats"),
                                          ("num_train_epochs", "epochs"), ("lora_rank", "lora_r")])
def test_the_closest_known_name_is_suggested(wrong, meant):
    from helpers.parameters import closest_name

    assert closest_name(wrong, ["lr", "repeats", "epochs", "lora_r", "lora_alpha", "name"]) == meant


def test_a_name_like_nothing_known_gets_no_guess():
    from helpers.parameters import closest_name

    assert closest_name("colour", ["lr", "repeats"]) is None


def test_a_misspelt_p_stops_the_run_before_any_notebook(tmp_path):
    r = helpers_command("run", "--work-dir", str(tmp_path / "w"), "--only", "02", "-p", "learning_rate", "1e-4")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: -p learning_rate (did you mean lr?) is not a parameter of any notebook;")
    assert "02: preset, base_model" in r.stderr and ", lr, " in r.stderr  # where the parameters are
    assert not (tmp_path / "w" / "executed").exists()


def test_a_misspelt_name_in_a_parameter_file_is_named_with_its_file(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("lr: 1e-4\nlearning_rate: 1e-4\nrepeatz: 40\n", encoding="utf-8")
    r = helpers_command("run", "--work-dir", str(tmp_path / "w"), "--only", "01,02", "-f", str(params))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: {params}: learning_rate (did you mean lr?) and {params}: repeatz "
                               "(did you mean repeats?) are not parameters of any notebook;")
    assert not (tmp_path / "w" / "executed").exists()


def test_a_parameter_of_a_notebook_only_leaves_out_is_reported(tmp_path):
    r = helpers_command("run", "--work-dir", str(tmp_path / "w"), "--only", "02", "-p", "lr", "1e-4",
                        "-p", "repeats", "40")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr == "error: -p repeats is a parameter of 01, which --only leaves out; add 01 to --only or drop it.\n"
    params = tmp_path / "params.yaml"
    params.write_text("system: 你好\n", encoding="utf-8")
    r = helpers_command("run", "--work-dir", str(tmp_path / "w"), "--only", "00,03", "-f", str(params))
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {params}: system is a parameter of 01, 02, 04, 05, which --only leaves out;")
    assert not (tmp_path / "w" / "executed").exists()


def test_work_dir_as_a_parameter_points_to_the_flag(tmp_path):
    r = helpers_command("run", "--work-dir", str(tmp_path / "w"), "--only", "00", "-p", "work_dir", str(tmp_path))
    assert r.returncode == 2 and "use --work-dir DIR instead" in r.stderr
    assert not (tmp_path / "w" / "executed").exists()


def test_a_class_run_checks_its_p_names_too(tmp_path):
    students = tmp_path / "students.csv"
    students.write_text("student_id,name\ns01,Ada\n", encoding="utf-8")
    r = helpers_command("run", "--class", str(students), "--work-dir", str(tmp_path / "class"), "--only", "00",
                        "-p", "lerning_rate", "1e-4")
    assert r.returncode == 2 and "-p lerning_rate (did you mean lr?)" in r.stderr
    assert not (tmp_path / "class").exists()


def test_the_train_command_suggests_the_closest_field(tmp_path):
    r = helpers_command("train", "--work-dir", str(tmp_path / "w"), "-p", "learning_rate", "1e-4")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: -p learning_rate (did you mean lr?) is not a TrainConfig field;")
