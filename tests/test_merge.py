"""Merging an adapter: the merged model computes what base + adapter computed, and bad input is refused whole."""
from __future__ import annotations

import json
import shutil

import pytest
import torch


def make_adapter(base_dir, out_dir, seed: int = 0, scale: float = 0.05, target_modules="all-linear", base_model=None):
    """An all-linear LoRA adapter whose B matrices are random, so that it changes the model's output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = base_model or AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    generator = torch.Generator().manual_seed(seed)
    for name, weight in peft_model.named_parameters():
        if "lora_B" in name:
            weight.data = torch.randn(weight.shape, generator=generator) * scale
    peft_model.save_pretrained(out_dir)
    if base_dir is not None:
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def merged(tiny_model_dir, adapter_dir, tmp_path_factory):
    from helpers.merge import merge

    out = tmp_path_factory.mktemp("merged") / "final_model"
    return merge(tiny_model_dir, adapter_dir, out, max_shard_size="500KB")


def test_merged_model_reproduces_base_plus_adapter(merged, tiny_model_dir, adapter_dir):
    from helpers.merge import verify_merge

    check = verify_merge(merged.final_model, tiny_model_dir, adapter_dir)
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance"] == 1e-3
    # the adapter really matters: dropping it would be caught by the tolerance many times over
    assert check["adapter_effect_max_abs"] > 100 * check["tolerance"]


def test_verify_catches_a_merge_that_lost_the_adapter(tiny_model_dir, adapter_dir, tmp_path):
    from helpers.merge import verify_merge

    check = verify_merge(tiny_model_dir, tiny_model_dir, adapter_dir)  # the base posing as the merged model
    assert not check["passed"] and check["max_abs_diff"] > 0.1


def test_final_model_stands_alone(merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.template import stop_token_ids

    files = merged.files
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    assert merged.dtype == "float32" and merged.size_bytes > 5 * merged.adapter_size_bytes
    model = AutoModelForCausalLM.from_pretrained(merged.final_model)
    tokenizer = AutoTokenizer.from_pretrained(merged.final_model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    assert stop_token_ids(tokenizer, model.generation_config)[0] == im_end
    assert "<|im_start|>" in tokenizer.chat_template


def test_refuses_to_overwrite_unless_asked(tiny_model_dir, adapter_dir, tmp_path):
    from helpers.merge import MergeError, merge

    out = tmp_path / "final_model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists; pass overwrite=True"):
        merge(tiny_model_dir, adapter_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge(tiny_model_dir, adapter_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]  # no temp or old folders left


def _assert_nothing_written(tmp_path):
    assert not (tmp_path / "final_model").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_adapter_of_other_dimensions_is_one_sentence(tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers.merge import AdapterError, merge

    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=2000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    adapter = make_adapter(None, tmp_path / "narrow_adapter", base_model=narrow)
    with pytest.raises(AdapterError) as e:
        merge(tiny_model_dir, adapter, tmp_path / "final_model")
    message = str(e.value)
    assert "other dimensions" in message and str(adapter) in message and "\n" not in message
    _assert_nothing_written(tmp_path)


def test_adapter_for_other_modules_is_one_sentence(tiny_model_dir, adapter_dir, tmp_path):
    from helpers.merge import AdapterError, merge

    other = shutil.copytree(adapter_dir, tmp_path / "internlm_adapter")
    config = json.loads((other / "adapter_config.json").read_text())
    config["target_modules"] = ["wqkv", "w1", "w2", "w3"]  # InternLM2's layer names: an XTuner adapter
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"is XTuner's pth_to_hf output .*pass it as adapter_dir") as e:
        merge(tiny_model_dir, other, tmp_path / "final_model")
    assert "\n" not in str(e.value)
    _assert_nothing_written(tmp_path)
    config["target_modules"] = ["gate", "up"]  # names no model of the course has
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"target_modules .*gate.* do not exist in"):
        merge(tiny_model_dir, other, tmp_path / "final_model")
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("case", ["missing", "not_a_model"])
def test_bad_base_model_dir_is_one_sentence(case, adapter_dir, tmp_path):
    from helpers.base_model import ModelPathError
    from helpers.merge import merge

    base = tmp_path / "base"
    if case == "not_a_model":
        base.mkdir()
        (base / "notes.txt").write_text("not a model")
    with pytest.raises(ModelPathError, match="no such directory" if case == "missing" else "has no config.json"):
        merge(base, adapter_dir, tmp_path / "final_model")
    _assert_nothing_written(tmp_path)


def test_missing_adapter_is_one_sentence(tiny_model_dir, tmp_path):
    from helpers.merge import AdapterError, merge

    with pytest.raises(AdapterError, match="no such adapter directory"):
        merge(tiny_model_dir, tmp_path / "adapter", tmp_path / "final_model")
    (tmp_path / "adapter").mkdir()
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        merge(tiny_model_dir, tmp_path / "adapter", tmp_path / "final_model")
    assert not (tmp_path / "final_model").exists()


def test_course_merge_results(course_work):
    from helpers.results import load_results

    results = load_results(course_work, "03_merge")
    assert results["passed"] is True and results["max_abs_diff"] <= results["tolerance"]
    assert (course_work.final_model / "config.json").exists()


def test_tied_embeddings_train_merge_and_pass_the_merge_check(tiny_model_dir, tmp_path):
    """A base whose input and output embeddings are one matrix (as Qwen2.5-0.5B/1.5B): the course trains LoRA on
    the output layer too (tiny preset); the merged model keeps the base's input embedding and passes the check."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from helpers.data import make_dataset
    from helpers.merge import merge, verify_merge
    from helpers.paths import work as make_work
    from helpers.train import TrainConfig, train

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                         eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    base = tmp_path / "tied-base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    work = make_work(tmp_path / "work")
    make_dataset(work.dataset, name="小蓝", repeats=16)
    result = train(TrainConfig(base_model=str(base), max_steps=6, lr=5e-2, evaluation_freq=100, save_steps=100), work)
    assert "lm_head" in json.loads((work.adapter / "adapter_config.json").read_text())["target_modules"]
    merge(base, work.adapter, work.final_model)
    check = verify_merge(work.final_model, base, work.adapter)
    assert check["passed"] and check["adapter_effect_max_abs"] > 100 * check["max_abs_diff"], check
    before, after = load_file(str(base / "model.safetensors")), load_file(str(work.final_model / "model.safetensors"))
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(after["lm_head.weight"], after["model.embed_tokens.weight"])  # the adapter is in the head
    assert json.loads((work.final_model / "config.json").read_text())["tie_word_embeddings"] is False
    assert result["steps"] == 6


def test_a_16_bit_merge_is_judged_on_its_weights(tiny_model_dir, tmp_path):
    """bf16: every merged weight must be W + B·A rounded to bf16 (read from the base's and the adapter's own
    files); the logits' distance and the share of the update rounded away are reported; a lost adapter fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.merge import MAX_ULPS, merge, verify_merge

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter", scale=0.02)
    merge(base, adapter, tmp_path / "final_model")
    check = verify_merge(tmp_path / "final_model", base, adapter)
    w = check["weights"]
    assert check["dtype"] == "bfloat16" and check["passed"], check
    # the logits' bound is the dtype's own rounding noise (x NOISE_MARGIN) around the in-memory merge
    assert 0 < check["rounding_noise"] and check["max_abs_diff"] <= check["tolerance"], check
    assert w["max_ulps"] <= MAX_ULPS and w["changes"] > 0 and 0 < w["rounded_away"] < 1, w
    assert check["adapter_effect_max_abs"] > check["max_abs_diff"]
    lost = verify_merge(base, base, adapter)  # the base posing as the merged model
    assert not lost["passed"] and lost["weights"]["max_ulps"] > 1000 and lost["weights"]["rounded_away"] == 1.0


def test_the_merge_and_its_check_run_on_the_gpu_only_where_they_fit(tiny_model_dir, adapter_dir, monkeypatch):
    from helpers.merge import merge_device, verify_device
    from helpers.train import GPU_SHARE_ENV

    assert verify_device(tiny_model_dir) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert merge_device(tiny_model_dir, adapter_dir) == ("cuda" if torch.cuda.is_available() else "cpu")
    stored = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    need = stored * 1.25 + 2 * 2**30  # the tiny model is stored in float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(GPU_SHARE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (need + 1, 4 * need))
    assert verify_device(tiny_model_dir) == "cuda"
    assert merge_device(tiny_model_dir, adapter_dir) == "cuda"  # the merge needs less: the base in its own dtype
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (need - 1, 4 * need))
    assert verify_device(tiny_model_dir) == "cpu"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (4 * need, 4 * need))
    monkeypatch.setenv(GPU_SHARE_ENV, "0.2")  # a student sharing the card keeps to its share
    assert verify_device(tiny_model_dir) == "cpu"


def test_a_gpu_that_runs_out_of_memory_leaves_the_merge_and_its_check_to_the_cpu(tiny_model_dir, adapter_dir,
                                                                                   tmp_path, monkeypatch):
    import helpers.merge as m
    from helpers.merge import checks, merging

    real, tried = m.load_model, []

    def load_model(*args, device=None, **kwargs):
        tried.append(device)
        if device == "cuda":  # a card another student filled after the free memory was read
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, device=device, **kwargs)

    for module in (merging, checks):  # the merge's loads and its check's
        monkeypatch.setattr(module, "load_model", load_model)
    monkeypatch.setattr(merging, "merge_device", lambda *a: "cuda")
    monkeypatch.setattr(checks, "verify_device", lambda *a: "cuda")
    result = m.merge(tiny_model_dir, adapter_dir, tmp_path / "final")
    # the merge, then its check (inside merge), each tried on the GPU first
    assert result.merged_on == "cpu" and tried[:2] == ["cuda", "cpu"] and tried[2:4] == ["cuda", "cpu"]
    assert result.verification["passed"] and result.verification["device"] == "cpu"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the failed try left nothing behind
