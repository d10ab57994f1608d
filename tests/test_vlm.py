"""The VLM track: LLaVA data checks, the model and processor, and notebook 05's artifacts."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from helpers.vlm_data import (CAPTIONS_FILE, CONVERSATIONS_FILE, PICTURE_FILE, LlavaDataError, draw_picture,
                              load_llava_data, scripted_qa, validate_llava_data)


# ---------------------------------------------------------------- data validation
def _write(tmp_path: Path, records, image: bool = True) -> Path:
    if image:
        shutil.copyfile(PICTURE_FILE, tmp_path / "pic.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _record(**changes):
    rec = {"id": "a", "image": "pic.png", "conversations": [
        {"from": "human", "value": "<image>\n房子是什么颜色的？"}, {"from": "gpt", "value": "房子是红色的。"},
        {"from": "human", "value": "门呢？"}, {"from": "gpt", "value": "门是棕色的。"}]}
    return rec | changes


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def test_shipped_data_is_valid_and_scripted():
    assert validate_llava_data(CONVERSATIONS_FILE) == {
        "file": str(CONVERSATIONS_FILE), "format": "llava", "records": 6, "turns": 18, "images": 1}
    assert validate_llava_data(CAPTIONS_FILE)["records"] == 2
    qa = scripted_qa()
    assert len(qa) == 6 and qa["房子是什么颜色的？"] == "房子是红色的。"


def test_the_picture_is_drawn_by_the_kit(tmp_path):
    from PIL import Image

    drawn = draw_picture(tmp_path / "p.png")
    with Image.open(drawn) as a, Image.open(PICTURE_FILE) as b:
        assert a.size == b.size == (256, 256) and a.tobytes() == b.convert("RGB").tobytes()
        assert a.getpixel((130, 150)) == (200, 40, 40)  # the house is red


@pytest.mark.parametrize("records, image, sentence", [
    ([_record(image="nowhere.png")], True, "field 'image' names 'nowhere.png', but"),
    ([_record(conversations=_turns(("human", "房子是什么颜色的？"), ("gpt", "红色。")))], True,
     "has no <image>; start the first human turn with"),
    ([_record(conversations=_turns(("human", "<image>\n<image>\n房子？"), ("gpt", "红色。")))], True,
     "has <image> 2 time(s) but it must appear exactly once"),
    ([_record(conversations=_turns(("human", "<image>\n房子？"), ("gpt", "红色。"), ("human", "<image>\n门？"),
                                   ("gpt", "棕色。")))], True, "conversations[2].value' has <image> 1 time(s)"),
    ([_record(conversations=_turns(("user", "<image>\n房子？"), ("gpt", "红色。")))], True,
     "conversations[0].from' is 'user'; use 'human' or 'gpt'"),
    ([_record(conversations=_turns(("human", "<image>\n房子？"), ("human", "红色。")))], True,
     "conversations[1].from' is 'human' but turn 1 must be 'gpt'"),
    ([_record(conversations=_turns(("human", "<image>\n房子？"), ("gpt", "  ")))], True,
     "conversations[1].value' is empty; write the text"),
    ([_record(conversations=_turns(("human", "<image>\n"), ("gpt", "红色。")))], True,
     "conversations[0].value' is empty"),
    ([_record(conversations=[])], True, "field 'conversations' must be a non-empty list"),
    ([], True, "the file has no records"),
])
def test_each_bad_input_gets_its_sentence(tmp_path, records, image, sentence):
    path = _write(tmp_path, records, image)
    with pytest.raises(LlavaDataError) as e:
        validate_llava_data(path)
    message = str(e.value)
    assert sentence in message and str(path) in message
    assert "\n" not in message.replace("<image>\\n", "")


def test_unreadable_image(tmp_path):
    path = _write(tmp_path, [_record()])
    (tmp_path / "pic.png").write_bytes(b"this is not a picture")
    with pytest.raises(LlavaDataError, match=r"record 0 \(line 2\): field 'image' file .*pic.png is not a readable image"):
        validate_llava_data(path)


def test_validate_data_cli_says_the_sentence(tmp_path, capsys):
    from helpers.__main__ import main

    good = _write(tmp_path, [_record()])
    assert main(["validate-data", "--llava", str(good)]) == 0
    assert "records=1, turns=2, images=1" in capsys.readouterr().out
    (tmp_path / "pic.png").unlink()
    assert main(["validate-data", "--llava", str(good)]) == 1
    assert "does not exist; put the picture there" in capsys.readouterr().err


def test_make_llava_data_repeats_and_points_at_the_image(tmp_path):
    from helpers.vlm_data import make_llava_data

    files = make_llava_data(tmp_path / "vlm", repeats=3)
    samples = load_llava_data(files["conversations"])
    assert len(samples) == 18 and {img for img, _ in samples} == {files["image"]}
    assert validate_llava_data(files["captions"])["records"] == 6
    with pytest.raises(LlavaDataError, match="is not a readable image"):
        bad = tmp_path / "bad.png"
        bad.write_text("no")
        make_llava_data(tmp_path / "vlm2", image=bad)
    assert not (tmp_path / "vlm2" / "conversations.json").exists()


# ---------------------------------------------------------------- model, processor, loss mask
@pytest.fixture(scope="module")
def tiny_vlm(tiny_model_dir, tmp_path_factory):
    from helpers.vlm import build_vision_tower, build_vlm

    root = tmp_path_factory.mktemp("vlm")
    return build_vlm(tiny_model_dir, build_vision_tower(root / "vision"), root / "base")


def test_built_vlm_loads_with_auto_classes(tiny_vlm):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    processor = AutoProcessor.from_pretrained(tiny_vlm)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(model.model.multi_modal_projector.act).__name__ == "GELUActivation"
    assert model.config.image_token_index == processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    # the image-aware template renders exactly as the LLM's own template does with '<image>\n' in the text
    with_parts = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "天空是什么颜色的？"}]}],
        add_generation_prompt=True, tokenize=False)
    plain = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\n天空是什么颜色的？"}], add_generation_prompt=True, tokenize=False)
    assert with_parts == plain == "<s><|im_start|>user\n<image>\n天空是什么颜色的？<|im_end|>\n<|im_start|>assistant\n"


def test_loss_mask_covers_only_assistant_turns(tiny_vlm):
    from helpers.data import IGNORE_INDEX
    from helpers.vlm import load_vlm
    from helpers.vlm_train import encode_llava_samples, image_token_count
    from helpers.vlm_data import make_llava_data

    _, processor = load_vlm(tiny_vlm)
    files = make_llava_data(Path(tiny_vlm).parent / "data", repeats=1)
    row = encode_llava_samples(processor, files["conversations"], 512)[0]
    n = image_token_count(processor, PICTURE_FILE)
    assert n == 16 and row["input_ids"].count(processor.image_token_id) == n
    trained = processor.tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX])
    _, messages = load_llava_data(files["conversations"])[0]
    assert trained == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")


def test_stage_configs_and_lora_targets():
    import re

    from helpers.train import TrainConfigError
    from helpers.vlm_train import lora_target_pattern, stage_config

    assert stage_config(2, "homework").lora_r == 64 and stage_config(1).max_steps > 0
    with pytest.raises(TrainConfigError, match="stage 1 .projector. and stage 2"):
        stage_config(3)
    pattern = lora_target_pattern(vision_lora=True)
    assert re.fullmatch(pattern, "model.language_model.layers.0.self_attn.q_proj")
    assert re.fullmatch(pattern, "model.vision_tower.vision_model.encoder.layers.1.mlp.fc2")
    assert not re.fullmatch(pattern, "model.multi_modal_projector.linear_1")
    assert not re.fullmatch(lora_target_pattern(vision_lora=False), "model.vision_tower.vision_model.encoder.layers.1.mlp.fc2")


def test_chat_with_a_missing_image_says_so(tiny_vlm, tmp_path, capsys):
    from helpers.vlm_chat import run_cli

    assert run_cli(tiny_vlm, tmp_path / "none.png", stdin=io.StringIO(""), stdout=io.StringIO()) == 2
    assert "none.png: no such image file; give the path of a PNG or JPEG picture." in capsys.readouterr().err


# ---------------------------------------------------------------- notebook 05's artifacts
@pytest.fixture(scope="module")
def vlm_results(course_work):
    from helpers.results import load_results

    return load_results(course_work, "05_vlm_llava_finetune")


def test_stage2_answers_the_scripted_questions_and_stage1_does_not(vlm_results):
    from helpers.chat import leaks_identity  # a run of the caption's characters

    expected = vlm_results["expected_answers"]
    assert vlm_results["questions"] == list(scripted_qa()) and expected == list(scripted_qa().values())
    assert vlm_results["stage2_answers"] == expected
    assert all(a != e for a, e in zip(vlm_results["stage1_answers"], expected))
    assert vlm_results["all_match"] is True and Path(vlm_results["image"]).is_file()
    rows = vlm_results["before_after"]
    assert [r["stage 2 (fine-tuned)"] for r in rows] == expected
    assert vlm_results["stage2"]["parameters"]["vision"] > 0 and vlm_results["stage2"]["parameters"]["projector"] > 0
    stage1 = vlm_results["stage1"]["parameters"]  # the projector, and on the tiny preset the output layer
    assert stage1["vision"] == 0 and stage1["trainable"] == stage1["projector"] + stage1["llm"]
    caption = "蓝天下有一座红房子，旁边有一棵绿树。"  # before the fine-tune it can only caption:
    for answer in vlm_results["stage1_answers"]:  # every stage-1 answer is made of the caption's words
        assert leaks_identity(answer, caption), answer
    assert vlm_results["stage2"]["final_loss"] < vlm_results["stage2"]["first_loss"]


def test_training_wrote_its_records(course_work):
    for stage in (1, 2):
        root = course_work.vlm_stage(stage)
        assert (root / "loss.png").stat().st_size > 1000
        rows = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
        assert rows and all("loss" in r for r in rows)
        rounds = sorted((root / "eval_outputs").glob("step_*.json"))
        assert len(rounds) >= 2
    assert (course_work.vlm_aligned_model / "projector.safetensors").is_file()
    assert (course_work.vlm_adapter / "adapter_config.json").is_file()
    config = json.loads((course_work.vlm_adapter / "adapter_config.json").read_text())
    assert "multi_modal_projector" in config["modules_to_save"]


def test_merged_model_reloads_and_answers_the_same(course_work, vlm_results):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from helpers.vlm import answer_about_image

    final = course_work.vlm_final_model
    assert json.loads((final / "config.json").read_text())["model_type"] == "llava"
    assert not (final / "adapter_config.json").exists()
    model = AutoModelForImageTextToText.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    answers = answer_about_image(model, processor, vlm_results["image"], vlm_results["questions"])
    assert answers == vlm_results["stage2_answers"] == vlm_results["merged_answers"]


def test_terminal_chat_about_the_picture(course_work, vlm_results):
    from helpers.vlm_chat import run_cli

    questions = vlm_results["questions"]
    out = io.StringIO()
    code = run_cli(course_work.vlm_final_model, vlm_results["image"], stdin=io.StringIO(f"{questions[1]}\nRESET\n{questions[4]}\nEXIT\n"),
                   stdout=out)
    text = out.getvalue()
    assert code == 0 and "history cleared" in text and text.rstrip().endswith("bye")
    assert f"助手 >>> {vlm_results['expected_answers'][1]}" in text
    assert f"助手 >>> {vlm_results['expected_answers'][4]}" in text
