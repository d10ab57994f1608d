"""Export: GGUF (f16, q8_0) through the gguf writer, loaded back by transformers with final_model's logits, its
embedded chat template and stop token; an Ollama Modelfile; the merged VLM refused in one sentence."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BOUND = {"f16": 2e-3, "q8_0": 3e-2}  # the largest logit difference, as a share of the largest logit


@pytest.fixture(scope="module")
def exported(course_work, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    result = subprocess.run([sys.executable, "-m", "helpers", "export", str(course_work.final_model), "--gguf",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


def _chat_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_the_gguf_loads_back_with_final_models_logits(course_work, exported, quant):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = f"final_model-{quant}.gguf"
    assert (exported / name).stat().st_size > 0 and not list(exported.glob("*.partial"))
    reference = AutoModelForCausalLM.from_pretrained(course_work.final_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(course_work.final_model)
    loaded = AutoModelForCausalLM.from_pretrained(exported, gguf_file=name, dtype=torch.float32)
    ids = _chat_ids(tokenizer, [{"role": "user", "content": "你是谁"}])
    with torch.no_grad():
        want, got = reference(ids).logits, loaded(ids).logits
    assert (want - got).abs().max() <= BOUND[quant] * want.abs().max()
    assert torch.equal(want.argmax(-1), got.argmax(-1))


def test_the_gguf_carries_the_chat_template_and_the_stop_token(course_work, exported):
    import gguf
    from transformers import AutoTokenizer

    from helpers.template import end_of_turn_token

    tokenizer = AutoTokenizer.from_pretrained(course_work.final_model)
    reader = gguf.GGUFReader(exported / "final_model-q8_0.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.chat_template"] == tokenizer.chat_template
    eot = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    assert fields["tokenizer.ggml.eot_token_id"] == eot
    # transformers rebuilds the tokenizer and the template from the file alone: the same chat, the same ids
    from_gguf = AutoTokenizer.from_pretrained(exported, gguf_file="final_model-q8_0.gguf")
    messages = [{"role": "system", "content": "你好"}, {"role": "user", "content": "你是谁"}]
    assert from_gguf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert _chat_ids(from_gguf, messages).tolist() == _chat_ids(tokenizer, messages).tolist()


def test_the_modelfile_names_the_file_the_template_and_the_stop(course_work, exported):
    text = (exported / "Modelfile").read_text(encoding="utf-8")
    assert text.startswith("FROM ./final_model-f16.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and "<|im_start|>assistant\n" in text
    assert "PARAMETER temperature 0" in text and "SYSTEM" not in text  # the course trains with no system prompt


def test_the_modelfile_keeps_a_trained_system_prompt(course_work):
    from helpers.export import ollama_modelfile

    assert 'SYSTEM """你是一个乐于助人的助手。"""' in ollama_modelfile(course_work.final_model, "x.gguf", "你是一个乐于助人的助手。")


def test_a_merged_vlm_is_refused_in_one_sentence(tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from helpers.export import ExportError, VLM_NOTE, write_gguf

    LlavaConfig(vision_config=CLIPVisionConfig(), text_config=LlamaConfig()).save_pretrained(tmp_path)
    with pytest.raises(ExportError) as e:
        write_gguf(tmp_path, tmp_path / "x.gguf")
    assert VLM_NOTE in str(e.value) and not (tmp_path / "x.gguf").exists()


def test_export_without_a_format_or_with_a_bad_folder_is_one_sentence(tmp_path):
    for args in (["export", str(tmp_path)], ["export", str(tmp_path / "missing"), "--gguf"]):
        result = subprocess.run([sys.executable, "-m", "helpers", *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    assert not Path(tmp_path / "export").exists()


def test_an_internlm2_model_keeps_its_sentencepiece_vocabulary(internlm2_converted, tmp_path):
    """The course's real model (after the kit's conversion): a byte-fallback vocabulary goes as llama.cpp's "llama"
    tokenizer, and transformers reads the same ids and logits back."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.export import write_gguf

    write_gguf(internlm2_converted, tmp_path / "internlm2.gguf", "f16")
    fields = gguf.GGUFReader(tmp_path / "internlm2.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.eot_token_id"].contents() == 92542  # <|im_end|>
    tokenizer = AutoTokenizer.from_pretrained(internlm2_converted)
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="internlm2.gguf")
    text = "你好，我是小明的小助手  Hello world! <|im_end|>"
    assert from_gguf(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    chat = _chat_ids(tokenizer, [{"role": "user", "content": "你是谁"}])
    assert _chat_ids(from_gguf, [{"role": "user", "content": "你是谁"}]).tolist() == chat.tolist()
    reference = AutoModelForCausalLM.from_pretrained(internlm2_converted, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="internlm2.gguf", dtype=torch.float32)
    with torch.no_grad():
        want, got = reference(chat).logits, loaded(chat).logits
    assert (want - got).abs().max() <= BOUND["f16"] * want.abs().max()


@pytest.fixture(scope="module")
def internlm2_7b(tmp_path_factory):
    """internlm2-chat-7b's layout and rope settings (dynamic NTK scaling, factor 2), tiny weights, converted."""
    from internlm2_standin import build_standin

    from helpers.internlm2 import convert_internlm2

    root = tmp_path_factory.mktemp("internlm2-7b")
    build_standin(root / "internlm2-chat-7b", family="internlm2-chat-7b")
    return convert_internlm2(root / "internlm2-chat-7b", root / "converted")


def _with_rope(model_dir, tmp_path, rope: dict):
    shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_theta": 1000000.0, **rope}
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    return tmp_path / "model"


def test_dynamic_rope_scaling_is_named_and_the_file_matches_within_the_trained_length(internlm2_7b, tmp_path):
    import gguf

    from helpers.export import export_gguf

    result = export_gguf(internlm2_7b, tmp_path / "out", quants=("f16",))
    assert "dynamic rope scaling is not written" in result["note"] and "32,768 tokens" in result["note"]
    fields = gguf.GGUFReader(result["gguf"]["f16"]).fields
    assert "llama.rope.scaling.type" not in fields and fields["llama.context_length"].contents() == 32768


def test_linear_rope_scaling_goes_into_the_gguf_and_yarn_is_refused(internlm2_7b, tmp_path):
    import gguf

    from helpers.export import ExportError, write_gguf

    linear = _with_rope(internlm2_7b, tmp_path / "linear", {"rope_type": "linear", "factor": 4.0})
    fields = gguf.GGUFReader(write_gguf(linear, tmp_path / "linear.gguf")).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 4.0
    yarn = _with_rope(internlm2_7b, tmp_path / "yarn", {"rope_type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 32768})
    with pytest.raises(ExportError, match="rope scaling 'yarn' is not one the kit writes to GGUF"):
        write_gguf(yarn, tmp_path / "yarn.gguf")
    assert not (tmp_path / "yarn.gguf").exists()
