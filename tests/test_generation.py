"""Answers to a list of questions are generated together (left padding), and each is token for token the answer the
question gets alone: on the tiny model, on the InternLM2 stand-in with the real tokenizer, and about an image."""
from __future__ import annotations

import pytest

QUESTIONS = ["你是谁", "请你介绍一下你自己", "你是我的小助手吗", "Who are you?", "推荐一本书吧",
             "What is the capital of France? Answer in one short sentence, please.", "1+1等于几？"]


def _generate_calls(model):
    """Counts model.generate calls (one per batch)."""
    calls = []
    generate = model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    model.generate = counted
    return calls


@pytest.mark.parametrize("system", ["", "你是一个乐于助人的助手"])
def test_batched_answers_equal_one_at_a_time_on_the_tiny_model(tiny_model_dir, system):
    from helpers.generation import generate_answers
    from helpers.merge import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    calls = _generate_calls(model)
    alone = generate_answers(model, tokenizer, QUESTIONS, system=system, batch_size=1)
    assert calls == [1] * len(QUESTIONS)
    together = generate_answers(model, tokenizer, QUESTIONS, system=system)
    assert calls[len(QUESTIONS):] == [len(QUESTIONS)]  # one batch
    assert together == alone
    assert len(set(alone)) > 1 and all(alone)  # real, different answers, not empty strings that match trivially


def test_batched_answers_equal_one_at_a_time_with_the_internlm2_tokenizer(internlm2_converted):
    from helpers.generation import generate_answers, greedy_batch
    from helpers.merge import load_model, load_tokenizer
    from helpers.template import stop_token_ids

    model, tokenizer = load_model(internlm2_converted, dtype="float32"), load_tokenizer(internlm2_converted)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for q in QUESTIONS]
    lengths = {len(p) for p in prompts}
    assert len(lengths) > 3  # the rows really are padded to different amounts
    # the stand-in ends its turn at once: the answers are held to 12 tokens, so every position is compared
    alone = generate_answers(model, tokenizer, QUESTIONS, batch_size=1, max_new_tokens=12, min_new_tokens=12)
    together = generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=12, min_new_tokens=12)
    assert together == alone and all(alone)
    stop = stop_token_ids(tokenizer, model.generation_config)
    rows = greedy_batch(model, tokenizer, prompts, 12, stop, min_new_tokens=12)
    assert rows == [greedy_batch(model, tokenizer, [p], 12, stop, min_new_tokens=12)[0] for p in prompts]
    # as it answers in the course: it stops at <|im_end|> (92542), in a batch as alone
    assert generate_answers(model, tokenizer, QUESTIONS) == generate_answers(model, tokenizer, QUESTIONS, batch_size=1)


def test_batched_image_answers_equal_one_at_a_time(tiny_model_dir, tmp_path):
    from helpers.vlm import answer_about_image, build_vision_tower, build_vlm, load_vlm
    from helpers.vlm_data import CONVERSATIONS_FILE, PICTURE_FILE, scripted_qa

    vlm = build_vlm(tiny_model_dir, build_vision_tower(tmp_path / "vision"), tmp_path / "vlm")
    model, processor = load_vlm(vlm)
    questions = list(scripted_qa(CONVERSATIONS_FILE)) + QUESTIONS[:3]
    calls = _generate_calls(model)
    alone = answer_about_image(model, processor, PICTURE_FILE, questions, batch_size=1)
    together = answer_about_image(model, processor, PICTURE_FILE, questions)
    assert calls == [1] * len(questions) + [len(questions)]
    assert together == alone and len(set(alone)) > 1
