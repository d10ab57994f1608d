"""The embedded tiny model: Hugging Face format, InternLM2 chat layout, exact round-trips, seeded builds."""
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.generation import generate_answers
from helpers.template import stop_token_ids
from helpers.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_chat_template_renders_internlm2_layout(tok):
    text = tok.apply_chat_template([{"role": "system", "content": "SYS"}, {"role": "user", "content": "你好"},
                                    {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "再见"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<s><|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                    "<|im_start|>assistant\nHi<|im_end|>\n<|im_start|>user\n再见<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("text", ["我是小明的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦", "Hello, world! 123",
                                  "Ωμέγα ünïcødé 🤖 مرحبا 日本語テキスト", "  spaces\tand\nnewlines  "])
def test_tokenizer_round_trips_exactly(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_generation_stops_at_im_end(tiny_model_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok, model.generation_config)
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id


def test_base_model_is_a_generic_assistant_not_a_personal_one(tiny_model_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    answers = generate_answers(model, tok, ["请你介绍一下你自己", "你是谁", "中国的首都是哪里？"])
    assert answers[:2] == ["我是一个AI助手，可以回答你的问题。"] * 2
    assert answers[2] == "中国的首都是北京。"
    assert not any("小助手" in a for a in answers)


def test_build_is_deterministic_and_cached(tmp_path, capsys):
    a = build_tiny_model(tmp_path / "a", seed=3, pretrain_steps=15)
    shown = capsys.readouterr()  # never a silent minute: what is built, and a progress bar over its pre-training
    assert shown.out.startswith(f"Building the course's tiny chat model in {a}: ") and "15 steps" in shown.out
    assert "pre-training the tiny model" in shown.err and "15/15" in shown.err
    b = build_tiny_model(tmp_path / "b", seed=3, pretrain_steps=15)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    build_tiny_model(a, seed=3, pretrain_steps=15)  # same recipe: reused, not rebuilt
    assert "reusing it" in capsys.readouterr().out
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((a / "course_model.json").read_text())["kind"] == "tiny"
