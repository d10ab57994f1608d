"""The whole course, run headless once on the defaults: every notebook executed, its results written."""
import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.runner import course_notebooks


def test_every_notebook_executed_with_results(course_work):
    for nb in course_notebooks():
        assert (course_work.executed / nb.name).exists(), nb.name
        assert course_work.result(nb.stem).exists(), f"{nb.stem} wrote no results JSON"


def test_base_model_and_data_artifacts(course_work):
    tok = AutoTokenizer.from_pretrained(course_work.model)
    AutoModelForCausalLM.from_pretrained(course_work.model)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    results = json.loads(course_work.result("01_data_generation").read_text(encoding="utf-8"))
    records = json.loads(course_work.dataset.read_text(encoding="utf-8"))
    assert len(records) == results["records"]
    assert sum(results["name"] in r["conversation"][0]["output"] for r in records) == results["identity_records"] == 2000
    env = json.loads(course_work.result("00_environment").read_text())
    assert env["recommended_preset"] == "tiny" and env["qlora_4bit"] is False
