"""The CUDA branches of the training plan, each against the plain path (`pytest -m gpu`; skipped without CUDA).

Every branch the plan can pick runs on a small random Llama (and one layer at internlm2-chat-1.8b's width): 16-bit
eager, compiled and Liger layers; NF4 eager and Liger; recomputation on and off; 1 vs 16 rows per forward. Each
branch's loss and adapter gradients are compared with the plain path's (fp32 weights, eager layers, one row at a
time). Then the fused NaN guard with an injected NaN, the tiny course learning its identity on CUDA, the GPU merge
and its check, and (with 2 GPUs) DDP equal to one GPU.
"""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=2048, tie_word_embeddings=False, max_position_embeddings=4096)
WIDE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=1, num_attention_heads=16,
            num_key_value_heads=8, vocab_size=92544, tie_word_embeddings=False, max_position_embeddings=4096)
HAS = {m: importlib.util.find_spec(m) is not None for m in ("bitsandbytes", "liger_kernel")}


def _model_dir(tmp_path_factory, dims, name):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dims))
    for p in model.parameters():  # a trained model's scale: random init gives near-uniform logits
        p.data.normal_(0, 0.02)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    from helpers.tiny_model import build_tokenizer

    build_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _model_dir(tmp_path_factory, SMALL, "small")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return _model_dir(tmp_path_factory, WIDE, "wide")


def _rows(vocab, n=16, length=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids, labels, pos = [], [], []
        while len(ids) < length - 8:
            k = int(torch.randint(8, 64, (1,), generator=g))
            k = min(k, length - len(ids))
            sample = torch.randint(3, vocab, (k,), generator=g).tolist()
            ids += sample
            labels += [-100] * (k // 2) + sample[k // 2:]
            pos += list(range(k))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows


def _loss_and_grads(model_dir, plan, rows, length=256):
    """One update's loss and its adapter gradients through the plan's branch (all rows, plan's rows per forward)."""
    from helpers.train import TrainConfig
    from helpers.train.data import Collator
    from helpers.train.model import load_model_for_training
    from helpers.train.packed import training_mode

    config = TrainConfig(preset="homework", max_length=length, lora_dropout=0.0, lora_r=16, lora_alpha=32,
                         base_model=model_dir).resolved()
    model, _ = load_model_for_training(config, plan, model_dir)  # onto the GPU as it loads
    for name, p in model.named_parameters():  # a trained adapter: lora_B = 0 would hide lora_A's gradient
        if "lora_B" in name:
            torch.manual_seed(1)
            p.data.normal_(0, 0.01)
    collate = Collator(0, plan.pad_to, plan.max_seq)
    items = sum(sum(lab != -100 for lab in r["labels"][1:]) for r in rows)
    total = 0.0
    with training_mode(model, plan):
        for start in range(0, len(rows), plan.rows_per_forward):
            batch = {k: v.to("cuda") if torch.is_tensor(v) else v
                     for k, v in collate(rows[start:start + plan.rows_per_forward]).items()}
            loss = model(**batch, num_items_in_batch=torch.tensor(float(items), device="cuda")).loss
            loss.backward()
            total += float(loss)
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    del model
    torch.cuda.empty_cache()
    return total, grads


def _plan(**changes):
    from helpers.train.plan import TrainingPlan

    base = TrainingPlan(device="cuda", weights="bf16", layers="eager", attention="varlen", loss="chunked",
                        loss_chunk=1024, rows_per_forward=1, accumulation=16, pad_to=256, max_seq=256,
                        optimizer="adamw_torch_fused", autocast=True)
    changes.setdefault("accumulation", 16 // changes.get("rows_per_forward", 1))
    if "rows_per_forward" in changes:
        changes.setdefault("pad_to", changes["rows_per_forward"] * 256)
    return dataclasses.replace(base, **changes)


def _close(got, want, loss_rel, grad_cos):
    (loss, grads), (loss_ref, grads_ref) = got, want
    assert loss == pytest.approx(loss_ref, rel=loss_rel)
    a = torch.cat([g.flatten() for g in grads.values()])
    b = torch.cat([grads_ref[n].flatten() for n in grads])
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert cos >= grad_cos, f"adapter gradients' cosine with the plain path's is {cos:.4f}"


@pytest.fixture(scope="module")
def plain_small(small):
    """The plain path: fp32 weights, eager layers, one row per forward, no autocast."""
    return _loss_and_grads(small, _plan(weights="fp32", autocast=False), _rows(SMALL["vocab_size"]))


BRANCHES = {
    "bf16 eager": dict(), "bf16 compiled": dict(layers="compiled"), "bf16 liger": dict(layers="liger"),
    "bf16 recomputed": dict(recomputation=True), "bf16 16 rows": dict(rows_per_forward=16),
    "bf16 block mask": dict(attention="block mask"),
    "nf4 eager": dict(weights="nf4"), "nf4 liger": dict(weights="nf4", layers="liger"),
    "nf4 recomputed": dict(weights="nf4", recomputation=True), "nf4 16 rows": dict(weights="nf4", rows_per_forward=16),
}


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_each_branch_trains_as_the_plain_path(branch, small, plain_small):
    changes = BRANCHES[branch]
    if changes.get("weights") == "nf4" and not HAS["bitsandbytes"]:
        pytest.fail("bitsandbytes is not installed on this GPU machine: pip install bitsandbytes (the GPU suite "
                    "runs every branch)")
    if changes.get("layers") == "liger" and not HAS["liger_kernel"]:
        pytest.fail("liger-kernel is not installed on this GPU machine: pip install liger-kernel")
    got = _loss_and_grads(small, _plan(**changes), _rows(SMALL["vocab_size"]))
    nf4 = changes.get("weights") == "nf4"  # 4-bit weights are another model: looser, still the same direction
    _close(got, plain_small, loss_rel=3e-2 if nf4 else 1e-2, grad_cos=0.9 if nf4 else 0.99)


def test_one_layer_at_real_width_in_bf16_and_nf4(wide):
    rows = _rows(WIDE["vocab_size"], n=4, length=512)
    plain = _loss_and_grads(wide, _plan(weights="fp32", autocast=False, pad_to=512, max_seq=512), rows, 512)
    for changes in (dict(), dict(layers="liger"), dict(weights="nf4"), dict(weights="nf4", recomputation=True)):
        if changes.get("weights") == "nf4" and not HAS["bitsandbytes"]:
            continue
        if changes.get("layers") == "liger" and not HAS["liger_kernel"]:
            continue
        got = _loss_and_grads(wide, _plan(pad_to=512, max_seq=512, **changes), rows, 512)
        nf4 = changes.get("weights") == "nf4"
        _close(got, plain, loss_rel=3e-2 if nf4 else 1e-2, grad_cos=0.9 if nf4 else 0.98)


def test_the_plan_on_this_gpu_uses_ligers_kernels_for_a_short_run(small):
    """The fault this suite was built after: on a big GPU `auto` silently trained without Liger's kernels."""
    from transformers import AutoConfig

    from helpers.train import TrainConfig
    from helpers.train.plan import make_plan

    plan = make_plan(TrainConfig(preset="homework").resolved(), AutoConfig.from_pretrained(small), updates=74)
    if HAS["liger_kernel"]:
        assert plan.layers == "liger", dict(plan.why)["layers"]
    assert plan.attention == "varlen" and plan.device == "cuda"


def test_the_fused_nan_guard_skips_the_bad_step_on_the_gpu(tiny_model_dir, tmp_path, monkeypatch):
    from helpers.data import make_dataset
    from helpers.paths import work as make_work
    from helpers.train import TrainConfig, TrainingDiverged, complete_checkpoints, train
    from helpers.train.trainer import CourseTrainer

    real, calls = CourseTrainer.compute_loss, []

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = real(self, model, inputs, return_outputs, num_items_in_batch)
        calls.append(1)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(CourseTrainer, "compute_loss", poisoned)
    w = make_work(tmp_path / "w")
    make_dataset(w.dataset, repeats=20)
    with pytest.raises(TrainingDiverged, match=r"^training stopped at update 3: the loss became nan"):
        train(TrainConfig(base_model=str(tiny_model_dir), max_steps=5, save_steps=2, evaluation_freq=100,
                          max_new_tokens=4, max_length=96, logging_steps=1, resume=False), w)
    assert [p.name for p in complete_checkpoints(w.checkpoints)] == ["checkpoint-2"] and not w.adapter.exists()


def test_the_tiny_course_learns_its_identity_on_cuda_and_merges_verified(tmp_path):
    from helpers import runner
    from helpers.paths import work as make_work

    w = make_work(tmp_path / "course")
    assert runner.run_course(work_dir=str(w.root), only=["00", "01", "02", "03"]) == 0, "00-03 failed on CUDA"
    import json

    results = json.loads((w.root / "results" / "02_qlora_finetune.json").read_text())
    assert results["identity_learned"], results.get("answers_after")
    verification = json.loads((w.final_model / "verification.json").read_text())
    assert verification["passed"], verification


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_on_two_gpus_trains_the_adapter_one_gpu_trains(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from helpers.data import make_dataset
    from helpers.paths import work as make_work
    from helpers.train import TrainConfig, train

    adapters = []
    for gpus in (1, 2):
        w = make_work(tmp_path / f"g{gpus}")
        make_dataset(w.dataset, repeats=20)
        train(TrainConfig(base_model=str(tiny_model_dir), max_steps=4, gradient_accumulation=2, num_gpus=gpus,
                          max_length=96, evaluation_freq=100, max_new_tokens=4, resume=False), w)
        adapters.append(load_file(str(w.adapter / "adapter_model.safetensors")))
    for k in adapters[0]:
        torch.testing.assert_close(adapters[1][k], adapters[0][k], rtol=2e-2, atol=2e-4)
