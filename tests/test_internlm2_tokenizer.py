"""The real InternLM2 tokenizer.model, converted: ids exactly InternLM2's (a reference built here from
sentencepiece itself plus the id rules), decoding, the chat template, and generation stopping at <|im_end|>."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from internlm2_standin import FIXTURE, SPECIAL, build_standin
from helpers.internlm2 import ConversionError, convert_internlm2, internlm2_tokenizer

SEED_SENTENCE = "我是小明的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦"
CORPUS = [
    SEED_SENTENCE, "请做一下自我介绍", "Hello world", " leading space", "trailing space ", "Hello, World! How are you?",
    "3.1415926 and 1,000,000 and 2026-11-29", "0123456789", "😀🎉👍🏽 emoji 👨‍👩‍👧", "a  b   c    d", "   ",
    "\n", "\n\n\nthree newlines\n", "tab\there\r\nwindows", "混合 English 和中文 123 句子。", "ＥＦＧ——全角……",
    "def f(x):\n    return x ** 2\n", "Ünïcödé façade naïve", "русский текст", "日本語のテキスト", "“引号”《书名》",
    "<|im_start|>user\n你好<|im_end|>\n", "<|plugin|><|interpreter|><|action_end|><|action_start|>", "<s>bos</s>",
    "text<|im_end|>more text", "",
]
SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, **{token: i for i, token in SPECIAL.items()}}
SPLIT = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_IDS, key=len, reverse=True)))


@pytest.fixture(scope="module")
def sp():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(FIXTURE))


def reference_ids(sp, text: str, add_bos: bool = True) -> list[int]:
    """InternLM2's ids: BOS first (add_bos_token), special tokens as whole ids, everything between by sentencepiece."""
    ids, start = [1] if add_bos else [], 0
    for match in SPLIT.finditer(text):
        ids += sp.encode(text[start:match.start()]) + [SPECIAL_IDS[match.group()]]
        start = match.end()
    return ids + sp.encode(text[start:])


@pytest.fixture(scope="module")
def tokenizer(internlm2_converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(internlm2_converted)


def test_ids_are_internlm2s_on_a_varied_corpus(tokenizer, sp):
    assert len(tokenizer) == 92544
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL.values()] == list(SPECIAL)
    wrong = [t for t in CORPUS if tokenizer(t)["input_ids"] != reference_ids(sp, t)]
    assert not wrong, f"{len(wrong)} of {len(CORPUS)} texts differ, e.g. {wrong[:3]}"
    assert tokenizer("Hello world")["input_ids"] == [1, 9843, 2028]  # no "▁" put in front of the text
    assert tokenizer(SEED_SENTENCE, add_special_tokens=False)["input_ids"] == reference_ids(sp, SEED_SENTENCE, False)


def test_decode_round_trips_and_drops_special_tokens(tokenizer):
    for text in CORPUS:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == "<s>" + text
        assert tokenizer.decode(ids, skip_special_tokens=True) == SPLIT.sub("", text)
    assert tokenizer.decode(tokenizer(" leading space")["input_ids"], skip_special_tokens=True) == " leading space"
    assert tokenizer.decode([92542]) == "<|im_end|>" and tokenizer.decode([92542], skip_special_tokens=True) == ""


@pytest.mark.parametrize("system, generation_prompt", [("", False), ("", True), ("你是一个有用的助手。", False),
                                                       ("你是一个有用的助手。", True)])
def test_chat_template_ids(tokenizer, sp, system, generation_prompt):
    turns = [("user", "请做一下自我介绍"), ("assistant", SEED_SENTENCE), ("user", "你是谁")]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": r, "content": c} for r, c in turns]
    text = "<s>" + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    text += "<|im_start|>assistant\n" if generation_prompt else ""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_dict=True)["input_ids"]
    assert list(ids) == reference_ids(sp, text, add_bos=False)
    assert ids[0] == 1 and ids[1] == 92543  # one BOS, then <|im_start|>


def test_generation_config_and_stop_ids_agree(internlm2_converted, tokenizer):
    from transformers import GenerationConfig

    from helpers.template import stop_token_ids
    from helpers.web_app import stop_ids

    config = GenerationConfig.from_pretrained(internlm2_converted)
    assert config.eos_token_id == [2, 92542]
    assert stop_token_ids(tokenizer, config) == [92542, 2]
    assert set(stop_ids(type("M", (), {"generation_config": config})(), tokenizer)) == {2, 92542}


class HoldsTurnFor(torch.nn.Module):
    """The stand-in's output layer, kept from saying <|im_end|> (which it says as soon as it may) for `n` tokens."""

    def __init__(self, head, n: int):
        super().__init__()
        self.head, self.n, self.calls = head, n, 0

    def forward(self, hidden):
        logits = self.head(hidden)
        self.calls += 1  # call 1 reads the prompt and gives the first token
        if self.calls <= self.n:
            logits[:, -1, 92542] = -1e9
        return logits


def test_generation_stops_at_im_end(internlm2_converted, tokenizer):
    from transformers import AutoModelForCausalLM

    from helpers.chat import ChatSession, GenerationSettings
    from helpers.generation import generate_answers

    model = AutoModelForCausalLM.from_pretrained(internlm2_converted, dtype=torch.float32)
    model.lm_head = head = HoldsTurnFor(model.lm_head, 2)
    enc = tokenizer.apply_chat_template([{"role": "user", "content": "你是谁"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    start = enc["input_ids"].shape[1]
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=model.generation_config.eos_token_id)
    assert out[0, start:].tolist()[-1] == 92542 and out.shape[1] == start + 3
    expected = tokenizer.decode(out[0, start:], skip_special_tokens=True).strip()
    assert expected and "<|im_end|>" not in expected and "UNUSED" not in expected
    head.calls = 0
    assert generate_answers(model, tokenizer, ["你是谁"], max_new_tokens=12) == [expected]
    head.calls = 0  # the chat CLI / notebook widget / web demo path: the same stop ids, streamed
    assert ChatSession(model, tokenizer, settings=GenerationSettings(max_new_tokens=12)).ask("你是谁") == expected
    head.calls = 0  # the contrast: stopping only at </s> (the bug this guards against), it runs to max_new_tokens
    assert model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=[2]).shape[1] == start + 12


@pytest.mark.parametrize("family", ["internlm2-chat-7b", "internlm2-chat-20b", "internlm2_5-7b-chat"])
def test_family_converts_with_its_head_counts_and_rope(tmp_path, family):
    from transformers import AutoModelForCausalLM

    src = tmp_path / family
    build_standin(src, family, layers=1, intermediate=32)
    model = AutoModelForCausalLM.from_pretrained(convert_internlm2(src, tmp_path / "converted"))
    cfg = json.loads((src / "config.json").read_text())
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (
        cfg["num_attention_heads"], cfg["num_key_value_heads"])
    assert model.config.rope_parameters["rope_type"] == "dynamic" and model.config.rope_parameters["factor"] == 2.0
    assert model.generation_config.eos_token_id == [2, 92542]


def test_unreadable_tokenizer_model_is_one_sentence(tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    shutil.copy2(FIXTURE, src / "tokenizer.model")
    (src / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:f868\nsize 1477754\n")
    with pytest.raises(ConversionError, match=r"m/tokenizer.model: cannot be read as a sentencepiece model .* download "
                                              r"tokenizer.model again"):
        internlm2_tokenizer(src)


def test_missing_sentencepiece_is_one_sentence(tmp_path, monkeypatch):
    import sys

    src = tmp_path / "m"
    src.mkdir()
    shutil.copy2(FIXTURE, src / "tokenizer.model")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "google.protobuf", None)
    with pytest.raises(ConversionError, match=r"m: reading its tokenizer.model needs the sentencepiece and protobuf "
                                              r"packages .*pip install sentencepiece protobuf"):
        internlm2_tokenizer(src)
