"""The base model's files name one set of special ids (config, generation_config, tokenizer), so transformers'
Trainer has nothing to realign (its warning showed as a red box in notebook 02), and the stop at <|im_end|>
survives training, merging and reloading."""
from __future__ import annotations

import contextlib
import json
import logging
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

ALIGNMENT_WARNING = "The tokenizer has new PAD/BOS/EOS tokens"


@contextlib.contextmanager
def transformers_warnings():
    """Every warning transformers logs inside the block (the suite runs with its verbosity at 'error')."""
    from transformers.utils import logging as hf_logging

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, level = Keep(), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    logging.getLogger("transformers").addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        hf_logging.set_verbosity(level)


def trainer_realigns(model_dir) -> list[str]:
    """What the Trainer's own alignment (run when it is built) would warn about for this model folder."""
    from transformers.trainer_utils import align_special_tokens

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    with transformers_warnings() as warned:
        align_special_tokens(model, tokenizer)
    return [w for w in warned if ALIGNMENT_WARNING in w]


def test_the_tiny_model_gives_the_trainer_nothing_to_realign(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert config["eos_token_id"] == tokenizer.eos_token_id and config["pad_token_id"] == tokenizer.pad_token_id
    assert trainer_realigns(tiny_model_dir) == []


def test_the_internlm2_conversion_takes_the_tokenizers_special_ids(tmp_path):
    """A checkpoint whose config.json names another pad id than its tokenizer: the converted copy agrees."""
    from internlm2_standin import build_standin

    from helpers.internlm2 import convert_internlm2

    build_standin(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps(config | {"pad_token_id": 0}))
    converted = convert_internlm2(tmp_path / "src", tmp_path / "converted")
    assert trainer_realigns(converted) == []
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 92542] and generation["pad_token_id"] == 2


def test_a_base_whose_files_disagree_gets_one_line_and_keeps_its_stop(tiny_model_dir, tmp_path, capsys):
    """Files as the tiny model had them (config eos [2, 4], tokenizer eos 2): the kit aligns them before the
    Trainer does, in one line on stdout instead of transformers' warning, and <|im_end|> still stops."""
    from helpers.template import align_special_ids

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    im_end = AutoTokenizer.from_pretrained(base).convert_tokens_to_ids("<|im_end|>")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"eos_token_id": [2, im_end]}))
    assert trainer_realigns(base)  # the red box this replaces

    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    capsys.readouterr()
    with transformers_warnings() as warned:
        assert align_special_ids(model, tokenizer) == {"eos_token_id": 2}
    out = capsys.readouterr().out
    assert warned == [] and out.count("\n") == 1 and out.startswith("note: the base model's config named other")
    assert "still stop at <|im_end|>" in out
    assert im_end in model.generation_config.eos_token_id
    from transformers.trainer_utils import align_special_tokens

    with transformers_warnings() as warned:  # the Trainer, built next, finds nothing left to change
        align_special_tokens(model, tokenizer)
    assert warned == []


def test_the_stop_at_im_end_survives_training_merge_and_reload(tiny_model_dir, tmp_path, capsys):
    from helpers.data import make_dataset
    from helpers.merge import merge
    from helpers.paths import work as make_work
    from helpers.train import TrainConfig, train

    w = make_work(tmp_path / "w")
    make_dataset(w.dataset, repeats=20, general_ratio=0)
    with transformers_warnings() as warned:
        train(TrainConfig(base_model=str(tiny_model_dir), max_steps=2, save_steps=100, evaluation_freq=100,
                          max_new_tokens=4, max_length=96, logging_steps=1), w)
    assert not [x for x in warned if ALIGNMENT_WARNING in x]
    assert "note: the base model's config" not in capsys.readouterr().out

    final = merge(tiny_model_dir, w.adapter, w.final_model).final_model
    model, tokenizer = AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.eos_token_id == tokenizer.eos_token_id and im_end in model.generation_config.eos_token_id
    assert trainer_realigns(final) == []
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "你是谁"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=64, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    assert out[-1] == im_end and len(out) < 64, tokenizer.decode(out)


@pytest.mark.parametrize("eos", [2, [2]])
def test_an_int_or_a_list_eos_in_generation_config_is_no_change(tiny_model_dir, eos, capsys):
    from helpers.template import align_special_ids

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    model.generation_config.eos_token_id = eos
    assert align_special_ids(model, tokenizer) == {} and capsys.readouterr().out == ""
