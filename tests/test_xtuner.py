"""XTuner in and out: a kit run exported as XTuner's config (parsed back knob by knob), and XTuner's adapters
(pth_to_hf output, iter_N.pth, a DeepSpeed iter_N.pth folder), written here in XTuner's exact formats on the
InternLM2-layout stand-in, converted into the kit's adapter and merged under verify_merge."""
from __future__ import annotations

import ast
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest

from helpers.xtuner import XTunerError
from xtuner_formats import ALPHA, COURSE_CFG, R, expected_merge, random_lora, write_deepspeed, write_iter_pth, write_pth_to_hf


# ---------------------------------------------------------------- out: the exported config
def _parsed(path: Path) -> tuple[dict, dict]:
    """(top-level literal settings, keyword literals of every dict(type=X, ...) call by X) of a config file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                top[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                top[node.targets[0].id] = ast.unparse(node.value)
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
            kinds = [ast.unparse(k.value) for k in node.keywords if k.arg == "type"]
            if kinds:
                calls[kinds[0]] = {k.arg: ast.unparse(k.value) for k in node.keywords}
    return top, calls


def _undefined_names(path: Path) -> set[str]:
    """Names the config reads at module level but never imports or assigns (a NameError in `xtuner train`)."""
    import builtins

    tree = ast.parse(path.read_text(encoding="utf-8"))
    known = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            known |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            known.add(node.id)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - known


def _work_with_record(tmp_path: Path, base: Path, quantization: str, **changes) -> "object":
    from helpers.paths import work
    from helpers.train import TrainConfig

    w = work(tmp_path / "work")
    config = TrainConfig(preset="homework", system="你是小明的小助手",
                         evaluation_inputs=["请你介绍一下你自己", "你是谁", "你是我的小助手吗"], **changes).resolved()
    w.adapter.mkdir(parents=True)
    record = {"hyper_parameters": config.hyper_parameters(), "preset": "homework", "quantization": quantization,
              "base_model": str(base), "data_file": str(w.dataset), "evaluation_inputs": config.evaluation_inputs}
    (w.adapter / "training_record.json").write_text(json.dumps(record, ensure_ascii=False))
    return w, config


def test_exported_config_repeats_the_run_knob_for_knob(tmp_path, internlm2_standin, internlm2_converted):
    from helpers.xtuner import CONFIG_NAME, export_config

    w, kit = _work_with_record(tmp_path, internlm2_converted, "nf4")
    path = export_config(w)
    assert path == w.root / "xtuner" / CONFIG_NAME
    top, calls = _parsed(path)
    assert not _undefined_names(path)
    acc = kit.gradient_accumulation
    assert top["pretrained_model_name_or_path"] == str(internlm2_standin.resolve())  # XTuner loads the original
    assert top["alpaca_en_path"] == str(w.dataset) and top["prompt_template"] == "PROMPT_TEMPLATE.internlm2_chat"
    expected = {"max_length": kit.max_length, "pack_to_max_length": kit.pack_to_max_length,
                "batch_size": kit.batch_size, "accumulative_counts": acc, "lr": kit.lr, "max_epochs": kit.epochs,
                "max_norm": kit.max_grad_norm, "warmup_ratio": kit.warmup_ratio, "save_steps": kit.save_steps * acc,
                "save_total_limit": kit.save_total_limit, "evaluation_freq": kit.evaluation_freq * acc,
                "SYSTEM": kit.system, "evaluation_inputs": kit.evaluation_inputs}
    assert {k: top[k] for k in expected} == expected
    assert "max_iters" not in top and calls["TrainLoop"]["max_epochs"] == "max_epochs"
    lora = calls["LoraConfig"]
    assert (int(lora["r"]), int(lora["lora_alpha"]), float(lora["lora_dropout"])) == (kit.lora_r, kit.lora_alpha,
                                                                                      kit.lora_dropout)
    assert ast.literal_eval(lora["target_modules"]) == ["wqkv", "wo", "w1", "w3", "w2"]  # InternLM2's names, no output
    nf4 = calls["BitsAndBytesConfig"]
    assert nf4["load_in_4bit"] == "True" and nf4["bnb_4bit_quant_type"] == "'nf4'" and nf4["bnb_4bit_use_double_quant"] == "True"
    assert calls["CheckpointHook"]["interval"] == "save_steps" and calls["CheckpointHook"]["max_keep_ckpts"] == "save_total_limit"
    assert calls["EvaluateChatHook"]["every_n_iters"] == "evaluation_freq" and calls["EvaluateChatHook"]["system"] == "SYSTEM"
    assert calls["LoggerHook"]["interval"] == str(kit.logging_steps * acc)
    assert calls["AmpOptimWrapper"]["accumulative_counts"] == "accumulative_counts"


def test_exported_config_of_a_step_count_run(tmp_path, capsys):
    from helpers.__main__ import main

    base = tmp_path / "llama"  # what the export reads of a Llama-layout base: its type and chat format
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (base / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                                              "<|im_end|>\n{% endfor %}")
    w, kit = _work_with_record(tmp_path, base, "none", max_steps=40, gradient_accumulation=4,
                               train_lm_head=True)
    assert main(["xtuner", "export-config", str(w.root), "--out", str(tmp_path / "run.py")]) == 0
    assert "xtuner train" in capsys.readouterr().out
    top, calls = _parsed(tmp_path / "run.py")
    assert top["max_iters"] == 160 and "max_epochs" not in top and calls["TrainLoop"]["max_iters"] == "max_iters"
    assert top["pretrained_model_name_or_path"] == str(base)
    assert top["prompt_template"] == "PROMPT_TEMPLATE.internlm2_chat"
    assert ast.literal_eval(calls["LoraConfig"]["target_modules"])[-1] == "lm_head"
    assert "BitsAndBytesConfig" not in calls and not _undefined_names(tmp_path / "run.py")


def test_export_without_a_run_says_so(tmp_path, capsys):
    from helpers.__main__ import main

    assert main(["xtuner", "export-config", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "training_record.json: no training record; run notebook 02" in err and err.count("\n") == 1


# ---------------------------------------------------------------- in: XTuner's adapters
@pytest.fixture(scope="module")
def standin_work(tmp_path_factory, internlm2_standin, internlm2_converted):
    """A work dir whose notebook 00 prepared the InternLM2 stand-in (converted to the Llama layout)."""
    from helpers.base_model import prepare_base_model
    from helpers.paths import work

    w = work(tmp_path_factory.mktemp("xtuner") / "work")
    shutil.copytree(internlm2_converted, w.converted_model)  # the session's conversion, reused by its record
    prepare_base_model(str(internlm2_standin), w)
    return w


@pytest.fixture(scope="module")
def lora(internlm2_standin):
    """Random LoRA weights on every linear layer of the stand-in, as XTuner's SupervisedFinetune.state_dict names them."""
    return random_lora(json.loads((internlm2_standin / "config.json").read_text()))



def _kit_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _expected_merge(standin: Path, lora: dict) -> dict:
    from safetensors.torch import load_file

    return expected_merge(load_file(str(standin / "model.safetensors")), json.loads((standin / "config.json").read_text()),
                          lora)


def test_each_xtuner_format_becomes_the_same_kit_adapter(tmp_path, standin_work, lora):
    from helpers.xtuner import XTUNER_RECORD, import_adapter

    sources = {"pth_to_hf": write_pth_to_hf(tmp_path / "huggingface", lora),  # `--fp32`: the values unrounded
               "checkpoint": write_iter_pth(tmp_path / "train" / "iter_768.pth", lora),
               "deepspeed": write_deepspeed(tmp_path / "train_deepspeed" / "iter_768.pth", lora)}
    (tmp_path / "train_deepspeed" / "internlm2_1_8b_qlora_alpaca_e3_copy.py").write_text(COURSE_CFG, encoding="utf-8")
    converted = {}
    for kind, source in sources.items():
        adapter = import_adapter(standin_work, source)
        assert json.loads((adapter / XTUNER_RECORD).read_text())["format"] == kind
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (R, ALPHA)
        assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj",
                                                     "q_proj", "up_proj", "v_proj"]
        assert json.loads((adapter / "chat_defaults.json").read_text())["system"] == "你是小明的小助手"
        converted[kind] = _kit_weights(adapter)
    first = converted["pth_to_hf"]
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight" in first
    for kind, weights in converted.items():
        assert weights.keys() == first.keys() and all((weights[k] == first[k]).all() for k in first), kind
    # lora_A is shared by q, k and v; lora_B's rows are split as the fused weight's are
    a = lora["llm.base_model.model.model.layers.1.attention.wqkv.lora_A.default.weight"]
    for p in "qkv":
        assert (first[f"base_model.model.model.layers.1.self_attn.{p}_proj.lora_A.weight"] == a).all()


def test_an_xtuner_checkpoint_merges_to_base_plus_adapter(tmp_path, standin_work, internlm2_standin, lora):
    from safetensors.torch import load_file

    from helpers.base_model import base_model_path
    from helpers.merge import merge
    from helpers.xtuner import import_adapter

    adapter = import_adapter(standin_work, write_iter_pth(tmp_path / "train" / "iter_768.pth", lora))
    result = merge(base_model_path(standin_work), adapter, tmp_path / "final_model", dtype="float32")
    assert result.verification["passed"], result.verification["problem"]
    merged = {}
    for f in sorted((tmp_path / "final_model").glob("*.safetensors")):
        merged.update(load_file(str(f)))
    expected = _expected_merge(internlm2_standin, lora)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        diff = (merged[name].float() - expected[name]).abs().max().item()
        assert diff < 1e-4, (name, diff)
    assert json.loads((tmp_path / "final_model" / "chat_defaults.json").read_text())["system"] == "你是小明的小助手"


def test_an_imported_adapter_is_reused_and_a_trained_one_is_kept(tmp_path, standin_work, lora):
    from helpers.xtuner import import_adapter

    source = write_pth_to_hf(tmp_path / "huggingface", lora, dtype=__import__("torch").float16)
    adapter = import_adapter(standin_work, source)
    stamp = (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    assert import_adapter(standin_work, source) == adapter
    assert (adapter / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert import_adapter(standin_work, None) == standin_work.adapter  # None: notebook 02's adapter, untouched
    shutil.rmtree(adapter)
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # an adapter notebook 02 trained
    with pytest.raises(XTunerError, match="holds the adapter notebook 02 trained") as e:
        import_adapter(standin_work, source)
    assert "\n" not in str(e.value) and (adapter / "adapter_config.json").read_text() == "{}"
    shutil.rmtree(adapter)


def _text_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, sentence", [
    (lambda d: _text_file(d / "notes.txt", "x"), "is neither XTuner's pth_to_hf output"),
    (lambda d: _text_file(d / "iter_5.pth", "not torch"), "cannot be read as a torch checkpoint"),
    (lambda d: d, "is neither XTuner's pth_to_hf output"),
    (lambda d: d / "missing.pth", "no such file or folder"),
    (lambda d: write_iter_pth(d / "llava" / "iter_2181.pth", {"projector.model.0.weight": __import__("torch").ones(2, 2)}),
     "is a LLaVA checkpoint (it holds a projector)"),
])
def test_a_file_that_is_neither_format_gets_one_sentence(tmp_path, standin_work, make, sentence):
    from helpers.xtuner import import_adapter

    source = make(tmp_path)
    with pytest.raises(XTunerError) as e:
        import_adapter(standin_work, source)
    assert sentence in str(e.value) and str(source.name) in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_without_its_config_says_where_alpha_lives(tmp_path, standin_work, lora):
    import torch

    from helpers.xtuner import import_adapter

    path = tmp_path / "iter_768.pth"
    torch.save({"state_dict": OrderedDict(lora)}, str(path))
    with pytest.raises(XTunerError, match="lora_alpha is recorded only in the training config"):
        import_adapter(standin_work, path)
    (tmp_path / "internlm2_1_8b_qlora_alpaca_e3_copy.py").write_text(COURSE_CFG, encoding="utf-8")
    assert json.loads((import_adapter(standin_work, path) / "adapter_config.json").read_text())["lora_alpha"] == ALPHA
    shutil.rmtree(standin_work.adapter)


def test_an_xtuner_adapter_where_a_kit_adapter_is_expected_gets_its_pointer(tmp_path, lora):
    from helpers.merge import AdapterError, check_adapter_dir

    source = write_pth_to_hf(tmp_path / "huggingface", lora)
    with pytest.raises(AdapterError, match="is XTuner's pth_to_hf output .*pass it as adapter_dir"):
        check_adapter_dir(source)


def test_chat_with_base_and_an_xtuner_adapter(tmp_path, standin_work, lora):
    from helpers.base_model import base_model_path
    from helpers.chat import ChatSession, GenerationSettings, load_chat_model

    source = write_pth_to_hf(tmp_path / "huggingface", lora)
    model, tokenizer = load_chat_model(base_model_path(standin_work), source)
    assert type(model).__name__ == "PeftModelForCausalLM" and "lm_head" in str(model.peft_config["default"].target_modules)
    assert isinstance(ChatSession(model, tokenizer, settings=GenerationSettings(max_new_tokens=4)).ask("你是谁"), str)
