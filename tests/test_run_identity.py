"""A run's identity is its content: the base model's files, the data, the knobs and the evaluation inputs decide
whether training resumes; the training record carries the base model's identity and the adapter's hash; the report
marks results that came from files changed since."""
from __future__ import annotations

import json

import pytest

from helpers.data import make_dataset
from helpers.fingerprint import file_sha256, folder_sha256, model_identity
from helpers.paths import work as make_work
from helpers.results import save_results
from helpers.tiny_model import build_tiny_model
from helpers.train import TrainConfig, TrainConfigError, evaluation_table, fingerprint_difference, train


def _config(**changes) -> TrainConfig:
    return TrainConfig(**(dict(max_steps=4, save_steps=2, save_total_limit=2, evaluation_freq=100, max_new_tokens=4,
                               max_length=96, logging_steps=1, seed=3) | changes))


@pytest.fixture
def run_work(tmp_path):
    """A work dir as notebooks 00 and 01 leave it: a (briefly pre-trained) tiny base in WORK/model, and the data."""
    w = make_work(tmp_path / "w")
    build_tiny_model(w.model, seed=1, pretrain_steps=5)
    make_dataset(w.dataset, repeats=20)
    return w


def test_a_base_model_rebuilt_in_place_starts_a_new_run_and_says_why(run_work, capsys):
    first = train(_config(), run_work)
    assert first["resumed_from"] is None and first["steps"] == 4
    same = train(_config(), run_work)  # identical fingerprint: the finished run is taken as it is
    assert same["resumed_from"].endswith("checkpoint-4")

    build_tiny_model(run_work.model, seed=2, pretrain_steps=5)  # notebook 00 again with another seed: same path
    capsys.readouterr()
    with pytest.raises(TrainConfigError, match=r"come from another run: the base model's weights changed "
                                               r"\(model\.safetensors\); set resume=False"):
        train(_config(resume=True), run_work)
    again = train(_config(), run_work)
    assert again["resumed_from"] is None and again["steps"] == 4
    assert ("note: starting a new run: the base model's weights changed (model.safetensors)"
            in capsys.readouterr().out)
    assert again["base_model_identity"]["content_sha256"] != first["base_model_identity"]["content_sha256"]
    assert again["adapter_sha256"] != first["adapter_sha256"]  # retrained on the new base, not the old adapter


def test_changed_evaluation_inputs_start_a_new_run(run_work, capsys):
    first = train(_config(), run_work)
    assert len(first["answers_before"]) == 3
    capsys.readouterr()
    again = train(_config(evaluation_inputs=["你叫什么名字"]), run_work)
    assert again["resumed_from"] is None
    assert "note: starting a new run: the evaluation inputs changed;" in capsys.readouterr().out
    assert len(again["answers_before"]) == len(again["answers_after"]) == 1
    assert list(evaluation_table(run_work).index) == ["你叫什么名字"]


def test_the_training_record_holds_the_base_models_identity_and_the_adapters_hash(run_work):
    result = train(_config(), run_work)
    record = json.loads((run_work.adapter / "training_record.json").read_text(encoding="utf-8"))
    identity = record["base_model_identity"]
    assert identity["source"] == "tiny" and identity["architecture"] == "LlamaForCausalLM"
    assert identity["content_sha256"] == model_identity(run_work.model, cached=False)["content_sha256"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(identity["files"])
    assert identity["parameters"] == json.loads((run_work.model / "course_model.json").read_text())["parameters"]
    assert record["data_sha256"] == file_sha256(run_work.dataset, cached=False)
    assert record["preset"] == "tiny" and record["evaluation_inputs"] == result["evaluation_inputs"]
    # The adapter's hash is over its files as saved; the record beside them is not part of it.
    assert record["adapter_sha256"] == result["adapter_sha256"] == folder_sha256(run_work.adapter, cached=False)
    with open(run_work.adapter / "adapter_model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert folder_sha256(run_work.adapter) != record["adapter_sha256"]


def test_fingerprint_differences_are_named():
    base = {"base_model": {"config.json": "a", "model.safetensors": "b", "tokenizer.json": "c"}, "data_sha256": "d",
            "training": {"lr": 0.002, "max_steps": 4}, "evaluation": {"evaluation_inputs": ["q"], "system": ""}}
    assert fingerprint_difference(base, json.loads(json.dumps(base))) is None
    assert fingerprint_difference(base, base | {"data_sha256": "e"}) == "the training data changed"
    assert (fingerprint_difference(base, base | {"base_model": base["base_model"] | {"tokenizer.json": "x",
                                                                                     "config.json": "y"}})
            == "the base model's config and tokenizer changed (config.json, tokenizer.json)")
    assert (fingerprint_difference(base, base | {"training": {"lr": 0.001, "max_steps": 4}})
            == "the training settings changed (lr 0.002 -> 0.001)")
    assert (fingerprint_difference(base, base | {"evaluation": {"evaluation_inputs": ["q"], "system": "s"}})
            == "the system prompt changed")
    assert "older version of the kit" in fingerprint_difference({"config": {}, "model": "/m", "data_sha256": "d"}, base)


def test_the_report_marks_results_from_an_older_run(tmp_path):
    from helpers.fingerprint import current_sources
    from helpers.report import build_report

    w = make_work(tmp_path / "w")
    w.adapter.mkdir()
    (w.adapter / "adapter_model.safetensors").write_bytes(b"first adapter")
    (w.adapter / "training_record.json").write_text("{}")
    save_results(w, "04_chat_demo", {"rows": [{"question": "你是谁", "before": "a", "after": "b"}],
                                     "sources": current_sources(w, ("adapter",))})
    build_report(w.root)
    assert "from an older run" not in (w.report / "index.html").read_text(encoding="utf-8").lower()

    (w.adapter / "training_record.json").write_text('{"rewritten": true}')  # a record is not content
    build_report(w.root)
    assert "from an older run" not in (w.report / "index.html").read_text(encoding="utf-8").lower()

    (w.adapter / "adapter_model.safetensors").write_bytes(b"another run's adapter")
    build_report(w.root)
    page = (w.report / "index.html").read_text(encoding="utf-8")
    assert '<section id="before-after" class="ran stale-section">' in page
    assert "From an older run: WORK/adapter has changed since these results were made from it" in page
    assert "Before / after (LLM)</a> (from an older run)" in page
    assert "**From an older run: WORK/adapter has changed" in (w.report / "index.md").read_text(encoding="utf-8")
