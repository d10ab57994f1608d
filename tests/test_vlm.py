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


def _real_llava_config():
    """internlm2-chat-1.8b's dimensions as the LLM, CLIP ViT-L/14 at 336 px as the vision tower (configs only)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=92544)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)
    return LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict())


@pytest.mark.parametrize("memory_gib, longest, rows", [
    (139.8, 190, (16, 1)),   # an H200, the course's picture (16 image tokens) and 3 short turns: one forward
    (24.0, 190, (16, 1)),    # a 24 GB card: still one forward
    (24.0, 760, (8, 2)),     # a CLIP-336 picture (577 positions) and its text: two forwards of 8
    (8.0, 1600, (1, 16)),    # an 8 GB card in 4-bit, 1,600-token records: one row at a time
    (4.0, 1600, (1, 16)),    # nothing fits: one row (the configured batch), never zero
])
def test_stage_rows_per_forward_fit_the_card(memory_gib, longest, rows):
    from helpers.train.plan import GIB, Hardware, make_plan
    from helpers.vlm_train import stage_config

    config = stage_config(2, "homework", gradient_checkpointing=True)
    plan = make_plan(config, _real_llava_config(), Hardware(cuda=True, memory_gib=memory_gib, bf16=True,
                                                           bitsandbytes=True), stage=2, longest=longest)
    got = (plan.rows_per_forward, plan.accumulation)
    assert got == rows and got[0] * got[1] == 16
    if rows[0] > 1:  # what it picked fits within ~85% of the card
        assert plan.estimate_gib * GIB <= 0.85 * memory_gib * GIB
    assert plan.loss == "model" and plan.recomputation


def test_stage_memory_estimate_leans_above_the_measured_peak():
    """benchmarks/gpu_vlm_real_dims.py on an H200: one row of 1,600 tokens (576 a CLIP-336 picture), NF4 LLM,
    recomputation, 103.8 M trainable weights: 2.88 GiB above the loaded model. The estimate may be above, not below."""
    from helpers.train.plan import GIB, vlm_row_bytes

    estimate = (vlm_row_bytes(_real_llava_config(), 1600, True) + 16 * 103.8e6) / GIB
    assert 2.88 <= estimate <= 1.6 * 2.88


class _Trainer:
    """What CourseTrainer.compute_loss reads of its Trainer, for calling it on its own."""

    args = type("Args", (), {"average_tokens_across_devices": False})()
    accelerator = type("Accelerator", (), {"num_processes": 1})()
    tokens_seen, update_loss = 0, 0.0


def test_rows_per_forward_do_not_change_the_update(tiny_vlm):
    """One forward of 4 padded rows and 4 forwards of one give the same token-averaged loss and gradients: the
    Trainer divides every micro-batch by the update's trained tokens (num_items_in_batch)."""
    import torch

    from helpers.data import IGNORE_INDEX
    from helpers.train.trainer import CourseTrainer
    from helpers.vlm import load_vlm
    from helpers.vlm_data import make_llava_data
    from helpers.vlm_train import LlavaCollator, encode_llava_samples

    model, processor = load_vlm(tiny_vlm)
    files = make_llava_data(Path(tiny_vlm).parent / "rows", repeats=1)
    rows = encode_llava_samples(processor, files["conversations"], 512)[:4]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # rows of different lengths: padding is exercised
    collate = LlavaCollator(processor.tokenizer.pad_token_id)
    items = torch.tensor(sum(sum(lab != IGNORE_INDEX for lab in r["labels"][1:]) for r in rows))

    def grads(batches):
        model.zero_grad()
        total = 0.0
        for batch in batches:
            loss = CourseTrainer.compute_loss(_Trainer(), model, collate(batch), num_items_in_batch=items)
            loss.backward()
            total += float(loss.detach())
        return total, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    one_loss, one = grads([rows])
    four_loss, four = grads([[r] for r in rows])
    assert one_loss == pytest.approx(four_loss, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(one, four))


def test_chat_with_a_missing_image_says_so(tiny_vlm, tmp_path, capsys):
    from helpers.vlm_chat import run_cli

    assert run_cli(tiny_vlm, tmp_path / "none.png", stdin=io.StringIO(""), stdout=io.StringIO()) == 2
    assert "none.png: no such image file; give the path of a PNG or JPEG picture." in capsys.readouterr().err


# ---------------------------------------------------------------- the course's LLaVA track
def test_homework_conversations_are_the_courses_size_and_the_tiny_ones_stay_short(tmp_path):
    from helpers.vlm_data import HOMEWORK_CONVERSATIONS_FILE, make_llava_data, preset_conversations

    assert preset_conversations("homework") == HOMEWORK_CONVERSATIONS_FILE
    assert preset_conversations("tiny") == CONVERSATIONS_FILE  # the tiny course asks 6 questions, not 15
    samples = load_llava_data(HOMEWORK_CONVERSATIONS_FILE)
    assert len(samples) == 6 and all(len(messages) == 20 for _, messages in samples)  # 6 x 10 turns
    qa = scripted_qa(HOMEWORK_CONVERSATIONS_FILE)
    for _, messages in samples:  # one question, one answer, in every conversation it appears in
        assert all(qa[q["content"].replace("<image>", "").strip()] == a["content"]
                   for q, a in zip(messages[::2], messages[1::2]))
    files = make_llava_data(tmp_path / "vlm", conversations_file=HOMEWORK_CONVERSATIONS_FILE, repeats=200)
    assert validate_llava_data(files["conversations"])["records"] == 1200  # 6 x 10 turns x 200, as the course


def test_the_students_own_picture_and_conversations_come_in_by_parameter(tmp_path):
    from PIL import Image

    from helpers.vlm_data import make_llava_data, preset_conversations

    Image.open(PICTURE_FILE).convert("RGB").save(tmp_path / "oph.jpg", format="JPEG")  # the course's is a JPEG
    own = _write(tmp_path, [_record(image="oph.jpg")], image=False)
    assert preset_conversations("homework", own) == own
    files = make_llava_data(tmp_path / "vlm", image=tmp_path / "oph.jpg", conversations_file=own, repeats=200)
    assert files["image"].name == "image.jpg" and len(load_llava_data(files["conversations"])) == 200


def _xtuner_projector(model, scale: float = 0.5) -> dict:
    """Random weights of XTuner's ProjectorModel (depth 2) sized for `model`, under its own keys."""
    import torch

    layer = model.model.multi_modal_projector
    g = torch.Generator().manual_seed(3)
    return {f"model.{i}.{kind}": torch.randn(getattr(layer, name).weight.shape if kind == "weight" else
                                             getattr(layer, name).bias.shape, generator=g) * scale
            for i, name in ((0, "linear_1"), (2, "linear_2")) for kind in ("weight", "bias")}


def test_the_courses_pretrained_projector_replaces_stage_1_and_stage_2_trains_from_it(tiny_vlm, tmp_path):
    import torch
    from safetensors.torch import save_file
    from xtuner_formats import write_iter_pth

    from helpers import vlm_train as vt
    from helpers.fingerprint import model_identity
    from helpers.paths import work
    from helpers.vlm import VlmError, load_vlm
    from helpers.vlm_data import make_llava_data

    w = work(tmp_path / "work")
    shutil.copytree(tiny_vlm, w.vlm_base_model)
    base, _ = load_vlm(tiny_vlm)
    projector = _xtuner_projector(base)
    # the LLaVA pretrain's iter_N.pth (LLM and vision frozen: its state_dict is the projector), and pth_to_hf's projector/
    checkpoint = write_iter_pth(tmp_path / "pretrain" / "iter_2181.pth", {f"projector.{k}": v for k, v in projector.items()})
    folder = tmp_path / "hf" / "projector"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["ProjectorModel"], "auto_map": {"AutoConfig": "configuration_projector.ProjectorConfig",
                                                          "AutoModel": "modeling_projector.ProjectorModel"},
        "bias": True, "depth": 2, "hidden_act": "gelu", "llm_hidden_size": projector["model.2.weight"].shape[0],
        "model_type": "projector", "torch_dtype": "float16", "visual_hidden_size": projector["model.0.weight"].shape[1]}))
    save_file({k: v.half() for k, v in projector.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})

    files = make_llava_data(w.vlm_data, repeats=2)
    for source, exact in ((folder.parent, False), (checkpoint, True)):
        record = vt.use_pretrained_projector(w, source, files["image"], ["请描述这张图片。"])
        aligned, _ = load_vlm(w.vlm_aligned_model)
        loaded = aligned.model.multi_modal_projector
        for i, name in ((0, "linear_1"), (2, "linear_2")):
            want = projector[f"model.{i}.weight"] if exact else projector[f"model.{i}.weight"].half().float()
            assert torch.equal(getattr(loaded, name).weight, want)
        assert record["pretrained_projector"] == str(source) and list(vt.evaluation_table(w, 1).columns) == ["step 0"]
    assert json.loads((w.vlm_aligned_model / "training_record.json").read_text())["steps"] == 0
    config = vt.stage_config(2, "tiny", max_steps=2, evaluation_freq=2, evaluation_inputs=["房子是什么颜色的？"])
    stage2 = vt.train_stage(w, 2, w.vlm_aligned_model, files["conversations"], files["image"], config)
    assert stage2["steps"] == 2 and stage2["model_identity"] == model_identity(w.vlm_aligned_model)
    assert (w.vlm_adapter / "adapter_config.json").exists()
    small = write_iter_pth(tmp_path / "other" / "iter_1.pth", {"projector.model.0.weight": torch.ones(8, 4),
                                                               "projector.model.0.bias": torch.ones(8),
                                                               "projector.model.2.weight": torch.ones(8, 8),
                                                               "projector.model.2.bias": torch.ones(8)})
    with pytest.raises(VlmError, match="maps 4 vision features to 8, but this LLaVA's vision encoder gives"):
        vt.use_pretrained_projector(w, small)


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
