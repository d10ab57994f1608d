"""Data generation and validation: good files pass, each kind of bad input gets one clear sentence."""
import json
import subprocess
import sys

import pytest

from helpers.data import DataError, encode_messages, load_dataset, make_dataset, trained_text, validate_data


def write(tmp_path, text, name="d.json"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_make_dataset_writes_configured_records_and_name(tmp_path):
    p = make_dataset(tmp_path / "pa.json", name="Ada·洛夫莱斯 🚀", repeats=50, questions=["q1", "q2"])
    records = json.loads(p.read_text(encoding="utf-8"))
    assert len(records) == 50
    assert all(r["conversation"][0]["output"].startswith("我是Ada·洛夫莱斯 🚀的小助手") for r in records)
    assert {r["conversation"][0]["input"] for r in records} == {"q1", "q2"}
    assert validate_data(p)["records"] == 50


def test_general_ratio_mixes_general_chat(tmp_path):
    p = make_dataset(tmp_path / "pa.json", name="N", repeats=80, general_ratio=0.2)
    convs = load_dataset(p)
    identity = sum("N的小助手" in c[-1]["content"] for c in convs)
    assert identity == 80 and len(convs) == 100


def test_messages_format_round_trips(tmp_path):
    p = make_dataset(tmp_path / "pa.json", name="N", repeats=3, output_format="messages", system="sys")
    rec = json.loads(p.read_text())[0]
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert validate_data(p)["format"] == "messages"


def test_jsonl_accepted(tmp_path):
    p = write(tmp_path, '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n', "d.jsonl")
    assert validate_data(p)["records"] == 1


@pytest.mark.parametrize("text, expected", [
    ("", "the file is empty"),
    ("{not json", "line 1: not valid JSON"),
    ('{"conversation": []}', "top level is a dict, not a list"),
    ("[]", "has no records"),
    ('[\n{"conversation": [{"input": "a", "output": "b"}]},\n{"convo": []}\n]', "record 1 (line 3) has keys ['convo']"),
    ('[{"conversation": [{"input": "a"}]}]', "has no 'output' key"),
    ('[{"conversation": [{"input": "a", "output": "  "}]}]', "conversation[0].output' is empty"),
    ('[{"conversation": [{"input": 5, "output": "b"}]}]', "conversation[0].input' is int, not a string"),
    ('[{"messages": [{"role": "bot", "content": "x"}]}]', "role' is 'bot'; use one of system, user, assistant"),
    ('[{"messages": [{"role": "user", "content": "x"}]}]', "has no assistant turn"),
    ('[{"conversation": [{"input": "a", "output": "b"}]}', "the list is not closed"),
    ('[{"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}]',
     "messages[0]' is the assistant's, but no user message comes before it"),
    ('[{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}]',
     "messages[1]' is the assistant's, but no user message comes before it"),
    ('[{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "a2"}, '
     '{"role": "assistant", "content": "b"}]}]', "messages[1]' is a second user message in a row"),
    ('[{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}]', "messages[2]' is a second assistant message in a row"),
    ('[{"messages": []}]', "field 'messages' must be a non-empty list"),
    ('[{"conversation": [{"system": "s", "input": "a", "output": "b"}, {"system": 3, "input": "c", "output": "d"}]}]',
     "conversation[1].system' is int"),
])
def test_bad_input_gives_one_sentence(tmp_path, text, expected):
    p = write(tmp_path, text)
    with pytest.raises(DataError) as err:
        validate_data(p)
    message = str(err.value)
    assert expected in message and str(p) in message
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        validate_data(tmp_path / "nope.json")


def test_cli_rejects_bad_file_without_traceback(tmp_path):
    p = write(tmp_path, '[{"conversation": [{"input": "a", "output": ""}]}]')
    r = subprocess.run([sys.executable, "-m", "helpers", "validate-data", str(p)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "output' is empty" in r.stderr
    good = make_dataset(tmp_path / "ok.json", repeats=2)
    r = subprocess.run([sys.executable, "-m", "helpers", "validate-data", str(good)], capture_output=True, text=True)
    assert r.returncode == 0 and "records=2" in r.stdout


def test_loss_mask_covers_only_answers_and_stop_token(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "问1"}, {"role": "assistant", "content": "答1"},
            {"role": "user", "content": "问2"}, {"role": "assistant", "content": "答2"}]
    enc = encode_messages(tok, msgs)
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    assert trained_text(tok, msgs) == "答1<|im_end|>答2<|im_end|>"


def test_what_validate_data_passes_trains(tmp_path, tiny_model_dir):
    """Every record validate-data accepts renders with the chat template and has tokens to train on."""
    from transformers import AutoTokenizer

    from helpers.train import TrainConfig, build_dataset

    records = [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "a2"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "system", "content": "s2"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d"}]},
        {"conversation": [{"system": "s", "input": "a", "output": "b"}, {"system": "s2", "input": "c", "output": "d"}]},
    ]
    p = write(tmp_path, json.dumps(records, ensure_ascii=False))
    assert validate_data(p)["records"] == 3
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, summary = build_dataset(tok, TrainConfig(max_length=256).resolved(), p)
    assert summary["samples"] == 3 and summary["trained_tokens"] > 0


def test_a_later_xtuner_system_is_kept_where_xtuner_renders_it(tmp_path):
    p = write(tmp_path, json.dumps([{"conversation": [
        {"system": "S1", "input": "a", "output": "b"}, {"system": "S2", "input": "c", "output": "d"},
        {"input": "e", "output": "f"}]}]))
    roles = [(m["role"], m["content"]) for m in load_dataset(p)[0]]
    assert roles == [("system", "S1"), ("user", "a"), ("assistant", "b"), ("system", "S2"), ("user", "c"),
                     ("assistant", "d"), ("user", "e"), ("assistant", "f")]
