"""The whole course, 00 -> 06, on a folder laid out like internlm2-chat-1_8b (real tokenizer and config files,
tiny random weights), given as `-p base_model DIR`; short settings, since only the path is under test."""
import json

from transformers import AutoTokenizer

from helpers.paths import work
from helpers.runner import run_course

SHORT = {"repeats": 4, "max_steps": 2, "evaluation_freq": 2, "save_steps": 2, "general_count": 1, "max_new_tokens": 8,
         "chat_max_new_tokens": 8, "demo_messages": ["你是谁"], "stage1_steps": 1, "stage2_steps": 1, "verify": False}


def test_course_runs_on_an_internlm2_checkpoint(internlm2_standin, tmp_path):
    w = work(tmp_path / "course")
    assert run_course(w.root, params={"base_model": str(internlm2_standin), **SHORT}, quiet=True) == 0, \
        f"the course failed on the InternLM2 stand-in; see {w.executed}"
    record = json.loads((w.model / "course_model.json").read_text())
    assert record["path"] == str(internlm2_standin) and record["converted"] == str(w.converted_model)
    assert json.loads(w.result("00_environment").read_text())["base_model"] == str(internlm2_standin)
    train = json.loads(w.result("02_qlora_finetune").read_text())
    assert train["steps"] == 2
    merge = json.loads(w.result("03_merge").read_text())
    assert merge["passed"] and merge["stop_token_ids"] == [92542, 2]
    final = AutoTokenizer.from_pretrained(w.final_model)
    assert len(final) == 92544 and final("你是谁")["input_ids"] == [1, 70447, 61297]
    chat = json.loads(w.result("04_chat_demo").read_text())
    assert all("UNUSED" not in row["after"] and "<|im_end|>" not in row["after"] for row in chat["rows"])
    assert json.loads(w.result("06_publish").read_text())["commit"]
