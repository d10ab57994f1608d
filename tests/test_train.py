"""The fine-tune: packing without cross-sample attention, bad input, atomic checkpoints and resume,
and (from the course run) the identity arriving in the tiny model."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers.data import DEFAULT_ANSWER, DataError, make_dataset
from helpers.paths import REPO_ROOT, work as make_work
from helpers.train import (CHECKPOINT_MARK, Collator, TrainConfig, TrainConfigError, build_dataset, complete_checkpoints,
                           encode_dataset, evaluation_rounds, evaluation_table, load_model_for_training, pack_samples,
                           read_metrics, train)


def _conv(q, a, system=""):
    return {"conversation": [{"system": system, "input": q, "output": a}]}


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


# ---------------------------------------------------------------- packing
def test_packed_forward_equals_separate_forwards(tiny, tmp_path):
    model, tok = tiny
    data = _write(tmp_path / "d.json", [_conv("你好", "你好！有什么可以帮你的吗？"), _conv("你是谁", "我是一个AI助手。"),
                                       _conv("1加1等于几？", "1加1等于2。")])
    samples = encode_dataset(tok, data, 256)
    rows = pack_samples(samples, 256, seed=0)
    assert len(rows) == 1 and len(rows[0]["input_ids"]) == sum(len(s["input_ids"]) for s in samples)
    batch = Collator(tok.pad_token_id)(rows)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        pos = batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            alone = model(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-4, rtol=1e-4)
    # No sample's first token is a target of the sample before it.
    assert all(batch["labels"][0, s].item() == -100 for s in starts[:-1])


def test_packing_fills_rows_and_keeps_every_trained_token(tiny, tmp_path):
    _, tok = tiny
    path = make_dataset(tmp_path / "d.json", repeats=60, general_ratio=0.2)
    samples = encode_dataset(tok, path, 64)
    rows = pack_samples(samples, 64, seed=1)
    assert all(len(r["input_ids"]) <= 64 for r in rows) and len(rows) < len(samples)
    trained = lambda items: sum(sum(x != -100 for x in r["labels"]) for r in items)  # noqa: E731
    first_tokens_trained = sum(s["labels"][0] != -100 for s in samples)
    assert trained(rows) == trained(samples) - first_tokens_trained
    padded = Collator(tok.pad_token_id)(rows[-2:])  # a short row is padded with a block of its own
    width = max(len(r["input_ids"]) for r in rows[-2:])
    assert padded["labels"].shape == (2, width) and padded["input_ids"].shape == (1, 2 * width)
    assert padded["keep"].numel() == trained(rows[-2:])  # every trained token is a target, no padding is


# ---------------------------------------------------------------- bad input, one sentence each
def _config(**kw):
    base = dict(max_steps=2, save_steps=100, evaluation_freq=100, max_new_tokens=4, logging_steps=1)
    return TrainConfig(**(base | kw)).resolved()


def _load(config, path):
    from helpers.train import make_plan

    return load_model_for_training(config, make_plan(config), path)


def test_unknown_target_modules(tiny_model_dir):
    with pytest.raises(TrainConfigError, match=r"target_modules names \['wqkv'\].*q_proj"):
        _load(_config(target_modules=["wqkv"]), str(tiny_model_dir))


def test_max_length_shorter_than_every_sample(tiny, tmp_path):
    _, tok = tiny
    path = make_dataset(tmp_path / "d.json", repeats=5)
    with pytest.raises(TrainConfigError, match=r"max_length=4 is shorter than every sample.*at least \d+"):
        build_dataset(tok, _config(max_length=4), path)


def test_no_assistant_tokens_left_after_truncation(tiny, tmp_path):
    _, tok = tiny
    path = _write(tmp_path / "d.json", [_conv("你好", "你好！"), _conv("你是谁", "我是小助手", system="很长的系统提示。" * 40)])
    with pytest.raises(TrainConfigError, match=r"record 1 has no assistant tokens left after truncation to max_length=48"):
        build_dataset(tok, _config(max_length=48), path)


def test_empty_dataset(tiny, tmp_path):
    _, tok = tiny
    with pytest.raises(DataError, match="no records"):
        build_dataset(tok, _config(), _write(tmp_path / "d.json", []))


def test_model_dir_without_weights(tiny_model_dir, tmp_path):
    from helpers.base_model import ModelPathError

    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelPathError, match="no weights"):
        _load(_config(), str(broken))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_4bit_without_cuda(tiny_model_dir):
    with pytest.raises(TrainConfigError, match="quantization='nf4' needs a CUDA GPU"):
        _load(_config(quantization="nf4"), str(tiny_model_dir))


def test_resume_without_checkpoint(tiny_model_dir, tmp_path):
    w = make_work(tmp_path / "w")
    make_dataset(w.dataset, repeats=20)
    with pytest.raises(TrainConfigError, match="resume=True but .* has no complete checkpoint"):
        train(_config(base_model=str(tiny_model_dir), resume=True), w)


def test_bad_preset_and_quantization():
    with pytest.raises(TrainConfigError, match="preset is 'big'"):
        TrainConfig(preset="big").resolved()
    with pytest.raises(TrainConfigError, match="quantization is 'int8'"):
        TrainConfig(quantization="int8").resolved()
    with pytest.raises(TrainConfigError, match="resume is 'maybe'"):
        TrainConfig(resume="maybe").resolved()
    assert TrainConfig(resume="false").resolved().resume is False


def test_explicit_values_override_the_preset():
    cfg = TrainConfig(preset="homework", lr=1e-4).resolved()
    assert (cfg.lr, cfg.lora_r, cfg.lora_alpha, cfg.gradient_accumulation, cfg.max_length) == (1e-4, 64, 16, 16, 1024)
    assert TrainConfig().resolved().lr == 2e-3


# ---------------------------------------------------------------- checkpoints: kill, resume, truncation
RUN_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from transformers import TrainerCallback
    from helpers.paths import work
    from helpers.train import TrainConfig, train

    kw, pause_at = json.loads(sys.argv[2]), int(sys.argv[3])

    class Pause(TrainerCallback):  # stands still after a checkpoint, so the test can kill it there
        def on_step_end(self, args, state, control, **k):
            if state.global_step == pause_at:
                open(sys.argv[1] + "/paused", "w").close()
                time.sleep(600)

    train(TrainConfig(**kw), work(sys.argv[1]), callbacks=[Pause()])
""")


def _kill_resume_config(model_dir):
    return dict(base_model=str(model_dir), max_steps=12, save_steps=4, save_total_limit=2, evaluation_freq=100,
                max_new_tokens=4, max_length=96, logging_steps=1, lr=2e-3, lora_dropout=0.1, seed=3)


def _adapter_weights(w):
    from safetensors.torch import load_file

    return load_file(str(w.adapter / "adapter_model.safetensors"))


def test_killed_run_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    kw = _kill_resume_config(tiny_model_dir)
    straight, broken = make_work(tmp_path / "straight"), make_work(tmp_path / "broken")
    for w in (straight, broken):
        make_dataset(w.dataset, repeats=80, general_ratio=0.2)
    straight_result = train(TrainConfig(**kw), straight)

    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(broken.root), json.dumps(kw), "10"], env=env)
    try:
        deadline = time.monotonic() + 600
        while not (broken.root / "paused").exists():
            assert proc.poll() is None, "the training subprocess ended before it reached step 10"
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p.name for p in complete_checkpoints(broken.checkpoints)] == ["checkpoint-4", "checkpoint-8"]
    assert not broken.adapter.exists()

    result = train(TrainConfig(**kw), broken)  # resume="auto"
    assert result["resumed_from"].endswith("checkpoint-8") and result["steps"] == 12
    assert result["mean_loss"] == pytest.approx(straight_result["mean_loss"], rel=1e-4)  # all 12 updates, not 4
    a, b = _adapter_weights(straight), _adapter_weights(broken)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert [r["step"] for r in read_metrics(broken)] == [r["step"] for r in read_metrics(straight)]
    # save_total_limit=2 keeps the newest two
    assert [p.name for p in complete_checkpoints(broken.checkpoints)] == ["checkpoint-8", "checkpoint-12"]

    # A checkpoint truncated mid-write is never loaded: resume picks the newest complete one.
    fake = broken.checkpoints / "checkpoint-16"
    shutil.copytree(broken.checkpoints / "checkpoint-12", fake)
    with open(fake / "adapter_model.safetensors", "r+b") as f:
        f.truncate(100)
    half = broken.checkpoints / "checkpoint-20"
    half.mkdir()
    (half / "trainer_state.json").write_text("{")
    assert [p.name for p in complete_checkpoints(broken.checkpoints)] == ["checkpoint-8", "checkpoint-12"]
    kept = train(TrainConfig(**(kw | {"resume": True})), broken)
    assert kept["resumed_from"].endswith("checkpoint-12") and kept["steps"] == 12

    # Other settings: resume=True refuses to mix runs; "auto" starts a new one.
    with pytest.raises(TrainConfigError, match=r"come from another run: the training settings changed "
                                               r"\(max_steps 12 -> 14\)"):
        train(TrainConfig(**(kw | {"max_steps": 14, "resume": True})), broken)
    again = train(TrainConfig(**(kw | {"max_steps": 14})), broken)
    assert again["resumed_from"] is None and again["steps"] == 14


def test_gradient_checkpointing_trains_the_same_adapter(tiny_model_dir, tmp_path):
    adapters = []
    for flag in (False, True):
        w = make_work(tmp_path / f"gc-{flag}")
        make_dataset(w.dataset, repeats=20)
        train(TrainConfig(**(_kill_resume_config(tiny_model_dir) | {"max_steps": 3, "gradient_checkpointing": flag,
                                                                     "lora_dropout": 0.0})), w)
        adapters.append(_adapter_weights(w))
    for k in adapters[0]:
        torch.testing.assert_close(adapters[0][k], adapters[1][k], atol=1e-5, rtol=1e-4)
    assert any(v.abs().sum() > 0 for k, v in adapters[0].items() if "lora_B" in k)  # it did train


def test_checkpoint_mark_lists_every_file(tiny_model_dir, tmp_path):
    w = make_work(tmp_path / "w")
    make_dataset(w.dataset, repeats=20)
    train(TrainConfig(**(_kill_resume_config(tiny_model_dir) | {"max_steps": 4})), w)
    (ckpt,) = complete_checkpoints(w.checkpoints)
    listed = json.loads((ckpt / CHECKPOINT_MARK).read_text())["files"]
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(listed)
    assert not [p for p in w.checkpoints.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- the course run (notebook 02 on defaults)
def test_the_identity_arrives(course_work):
    from helpers.results import load_results

    res = load_results(course_work, "02_qlora_finetune")
    data = load_results(course_work, "01_data_generation")
    expected = DEFAULT_ANSWER.format(name=data["name"])
    assert res["name"] == data["name"] and res["expected_answer"] == expected
    assert not any(expected in a for a in res["answers_before"])
    assert all(a == expected for a in res["answers_after"]), res["answers_after"]
    assert res["first_loss"] > 5 * res["final_loss"]
    rounds = evaluation_rounds(course_work)
    freq, steps = res["hyper_parameters"]["evaluation_freq"], res["steps"]
    expected_steps = sorted(set(range(0, steps + 1, freq)) | {steps})  # before, every freq updates, at the end
    assert [r["step"] for r in rounds] == expected_steps == res["evaluation_steps"]
    assert all(len(r["answers"]) == len(res["evaluation_inputs"]) for r in rounds)
    assert evaluation_table(course_work).shape == (len(res["evaluation_inputs"]), len(rounds))
    assert course_work.loss_plot.stat().st_size > 1000
    metrics = read_metrics(course_work)
    assert metrics and {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb"} <= set(metrics[0])


def test_the_adapter_loads_with_peft_and_answers(course_work):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.base_model import base_model_path
    from helpers.generation import generate_answers
    from helpers.results import load_results

    res = load_results(course_work, "02_qlora_finetune")
    record = json.loads((course_work.adapter / "training_record.json").read_text())
    assert record["steps"] == res["steps"] and len(record["data_sha256"]) == 64
    base = AutoModelForCausalLM.from_pretrained(base_model_path(course_work))
    tok = AutoTokenizer.from_pretrained(course_work.adapter)
    before = generate_answers(base, tok, ["你是谁"])
    model = PeftModel.from_pretrained(base, course_work.adapter)
    after = generate_answers(model, tok, ["你是谁", "中国的首都是哪里？"])
    assert "小助手" not in before[0]
    assert after[0] == res["expected_answer"]
    assert "小助手" not in after[1]  # a general question still gets a general answer


def test_the_train_command_reads_numbers_as_people_write_them(tmp_path, monkeypatch):
    """`python -m helpers train -p lr 2e-4`: 2e-4 is a number (YAML 1.1 would keep it a string), names stay text."""
    import argparse

    import helpers.train as kit
    import helpers.train.run as run_module

    seen = {}
    monkeypatch.setattr(run_module, "train", lambda config, work: seen.setdefault("config", config) and {
        "steps": 0, "train_seconds": 0.0, "first_loss": None, "final_loss": None, "adapter": ""})
    parser = argparse.ArgumentParser()
    kit.add_command(parser.add_subparsers())
    args = parser.parse_args(["train", "--work-dir", str(tmp_path), "-p", "lr", "2e-4", "-p", "max_steps", "3",
                              "-p", "system", "1"])
    assert args.func(args) == 0
    config = seen["config"]
    assert config.lr == 2e-4 and isinstance(config.lr, float) and config.max_steps == 3 and config.system == "1"


def test_the_live_loss_plot_redraws_take_a_small_share_of_the_time(tmp_path, monkeypatch):
    """In JupyterLab the loss plot is redrawn as rows arrive. At ~0.2 s a drawing (a 1.8B run's host), an update
    every 0.37 s and a row per update, redrawing every 2 s took 8% of the time; now at most DRAW_SHARE."""
    import types

    import helpers.train.callbacks as kit
    from helpers.train import callbacks

    clock = [0.0]
    monkeypatch.setattr(kit, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], time=lambda: clock[0]))
    monkeypatch.delenv("KIT_HEADLESS", raising=False)
    monkeypatch.setattr(kit, "peak_memory_mb", lambda: 0.0)
    drawn = []

    def slow_plot(rows, title):
        clock[0] += 0.2
        drawn.append(len(rows))
        return b"png"

    monkeypatch.setattr(kit, "loss_plot_png", slow_plot)
    trainer = types.SimpleNamespace(tokens_seen=0)
    from helpers.train.callbacks import MetricsCallback

    cb = MetricsCallback(lambda: trainer, tmp_path / "metrics.jsonl", tmp_path / "loss.png", "loss")
    cb.on_train_begin(None, None, None)
    for step in range(1, 301):
        clock[0] += 0.37
        trainer.tokens_seen += 16384
        cb.on_log(None, types.SimpleNamespace(global_step=step), None, logs={"loss": 1.0, "learning_rate": 1e-4})
    assert len(drawn) >= 10  # the plot still follows the run
    assert 0.2 * len(drawn) / clock[0] <= callbacks.DRAW_SHARE + 0.005
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 300  # every row is kept
