"""The training plan (helpers.train.plan), decided once on the CPU for given machines, and the engine's guards:
the NaN guard, fp32 adapters, the output layer's adapter, the structure a newcomer reads."""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from helpers.data import make_dataset
from helpers.paths import REPO_ROOT
from helpers.paths import work as make_work
from helpers.train import TrainConfig, TrainingDiverged, complete_checkpoints, train
from helpers.train import plan as pl

REAL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=8, vocab_size=92544, tie_word_embeddings=False)


def _gpu(memory, liger=None, bf16=True, bnb=True):
    return pl.Hardware(cuda=True, memory_gib=memory, bf16=bf16, bitsandbytes=bnb, varlen=True, liger=liger)


def _real():
    from transformers import LlamaConfig

    return LlamaConfig(**REAL)


def _short(model_dir, **kw):
    return TrainConfig(**(dict(base_model=str(model_dir), max_steps=3, save_steps=2, evaluation_freq=100,
                               max_new_tokens=4, max_length=96, logging_steps=1, resume=False) | kw))


class _Poisoned(torch.nn.Module):
    """The model, but its loss is NaN (as a diverged update's would be)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kw):
        out = self.model(**kw)
        out.loss = out.loss * float("nan")
        return out


@pytest.mark.parametrize("quantization,memory,expected", [
    # (weights, recomputation, rows per forward, forwards per update) for the homework (16 rows of 1024)
    ("auto", 141, ("bf16", False, 16, 1)), ("auto", 80, ("bf16", False, 16, 1)),
    ("auto", 24, ("bf16", False, 4, 4)), ("auto", 8, ("nf4", True, 8, 2)),
    ("nf4", 141, ("nf4", False, 16, 1)), ("nf4", 24, ("nf4", False, 4, 4)), ("nf4", 8, ("nf4", True, 8, 2)),
])
def test_the_plan_fits_the_card(quantization, memory, expected):
    config = TrainConfig(preset="homework", quantization=quantization).resolved()
    plan = pl.make_plan(config, _real(), _gpu(memory), updates=74)
    assert (plan.weights, plan.recomputation, plan.rows_per_forward, plan.accumulation) == expected
    assert plan.rows_per_forward * plan.accumulation == 16  # the course's update, whatever the card
    assert plan.estimate_gib <= 0.9 * memory
    assert plan.loss_chunk == (4096 if memory >= 40 else 1024)
    assert plan.pad_to == plan.rows_per_forward * 1024 and plan.adapters == "fp32" and plan.autocast
    assert plan.layers == "liger" and plan.attention == "varlen" and plan.optimizer == "adamw_torch_fused"
    assert set(plan.table().index) == {"weights", "adapters", "layers", "attention", "loss", "rows per forward",
                                       "recomputation", "strategy"}
    assert all(plan.table()["why"])  # every choice says why


def test_the_plan_is_made_once_and_cannot_be_edited():
    plan = pl.make_plan(TrainConfig().resolved(), hardware=pl.Hardware())
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.layers = "compiled"
    assert (plan.device, plan.weights, plan.attention, plan.loss) == ("cpu", "fp32", "block mask", "chunked")


def test_the_plan_says_when_nothing_fits_and_where_4bit_cannot_run():
    from helpers.train import TrainConfigError

    config = TrainConfig(preset="homework", quantization="nf4").resolved()
    plan = pl.make_plan(config, _real(), _gpu(3))
    assert (plan.weights, plan.recomputation, plan.rows_per_forward) == ("nf4", True, 1)
    assert "does not fit" in dict(plan.why)["rows per forward"]
    with pytest.raises(TrainConfigError, match="^quantization='nf4' needs a CUDA GPU"):
        pl.make_plan(config, _real(), pl.Hardware())


def test_the_plans_estimate_meets_the_measured_peak():
    """H200, 1.8B dims, the homework's 16 rows of 1024 in one forward, eager bf16 layers: 61.6 GiB measured."""
    plan = pl.make_plan(TrainConfig(preset="homework").resolved(), _real(), _gpu(139.8), updates=74)
    assert plan.rows_per_forward == 16
    assert plan.estimate_gib == pytest.approx(61.6, rel=0.05)


@pytest.mark.parametrize("weights,updates,strategy,liger,layers", [
    ("none", 74, "ddp", None, "liger"),        # the homework's 74 updates do not win back compiling
    ("none", 400, "ddp", None, "compiled"),    # a long run compiles its 16-bit layers
    ("nf4", 400, "ddp", None, "liger"),        # 4-bit layers always run eager
    ("none", 400, "fsdp", None, "liger"),      # FSDP gathers each layer in its own forward
    ("none", 74, "ddp", "RuntimeError: Failed to find C compiler.", "eager"),  # Liger cannot run: said why
])
def test_the_layers_follow_the_runs_length_the_weights_and_the_kernels(weights, updates, strategy, liger, layers):
    config = TrainConfig(preset="homework", quantization=weights, distributed=strategy).resolved()
    plan = pl.make_plan(config, _real(), _gpu(141, liger=liger), updates=updates, ranks=2 if strategy == "fsdp" else 1)
    assert plan.layers == layers
    if liger:
        assert liger in dict(plan.why)["layers"]


def test_the_liger_probe_runs_on_the_gpu_the_run_trains_on(monkeypatch):
    """The fault this replaces: the probe ran on the device of the model's first parameter, the CPU for a 16-bit
    model before the Trainer moved it, so Liger was silently off on every big GPU."""
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(pl, "gpu_memory_gib", lambda *a: 80.0)
    monkeypatch.setattr(pl, "_has", lambda module: True)
    monkeypatch.setattr(pl, "fused_kernels_fail", lambda device: seen.append(device))
    import helpers.train.packed as pk

    monkeypatch.setattr(pk, "varlen_available", lambda: True)
    hw = pl.Hardware.detect()
    assert seen == ["cuda"] and hw.liger is None and hw.cuda


def _stand_in_liger(calls: list, kernel_error: Exception | None = None):
    """liger_kernel.transformers as the kit uses it: the Llama patch (recorded) and an RMSNorm for the probe."""
    import types

    class RMSNorm(torch.nn.Module):
        def __init__(self, hidden, eps=1e-6):
            super().__init__()
            self.eps = eps

        def forward(self, x):
            if kernel_error is not None:
                raise kernel_error
            return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    liger = types.ModuleType("liger_kernel.transformers")
    liger.LigerRMSNorm = RMSNorm
    liger.apply_liger_kernel_to_llama = lambda **kw: calls.append(kw)
    return liger


def test_ligers_probe_names_what_stops_it(monkeypatch):
    import sys
    import types

    broken = RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", _stand_in_liger([], broken))
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    assert pl.fused_kernels_fail("cpu").startswith("RuntimeError: Failed to find C compiler")
    wrong = _stand_in_liger([])
    wrong.LigerRMSNorm = lambda hidden, eps: torch.nn.Identity()  # a kernel that runs but leaves its input as is
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", wrong)
    assert "from the formula" in pl.fused_kernels_fail("cpu")
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", _stand_in_liger([]))
    assert pl.fused_kernels_fail("cpu") is None


def test_the_vlm_stages_are_planned_by_the_same_function():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vlm = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                     num_attention_heads=16,
                                                     image_size=336, patch_size=14), text_config=LlamaConfig(**REAL))
    from helpers.vlm_train import stage_config

    one = pl.make_plan(stage_config(1, "homework"), vlm, _gpu(24), stage=1, longest=700)
    two = pl.make_plan(stage_config(2, "homework"), vlm, _gpu(8), stage=2, longest=700)
    assert one.weights == "bf16" and one.loss == "model" and not one.recomputation
    assert two.weights == "nf4" and two.recomputation and two.rows_per_forward * two.accumulation == 16


def test_the_schedules_last_update_survives_in_the_adapters_precision():
    """Why the adapters are fp32: the homework's last cosine update (34 updates, lr 2e-4) is ~5e-7, far below
    bf16's spacing at a LoRA weight's size (6e-5 at 0.01); fp32 keeps it (spacing 1e-9)."""
    updates, warm = 34, 1
    last_lr = 2e-4 * 0.5 * (1 + math.cos(math.pi * (updates - 1 - warm) / (updates - warm)))
    assert 1e-7 < last_lr < 1e-6
    kept = {}
    for dtype in (torch.bfloat16, torch.float32):
        p = torch.nn.Parameter(torch.full((64,), 0.01, dtype=dtype))
        opt = torch.optim.AdamW([p], lr=last_lr, weight_decay=0.0)
        p.grad = torch.ones_like(p)
        before = p.detach().clone()
        opt.step()
        kept[dtype] = bool((p.detach() != before).all())
    assert kept == {torch.bfloat16: False, torch.float32: True}
    # the kit's adapters on a 16-bit model are fp32 (and AdamW's states follow them)
    from helpers.train.model import load_model_for_training
    from helpers.tiny_model import build_tiny_model

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model, _ = load_model_for_training(TrainConfig().resolved(), pl.TrainingPlan(weights="bf16"),
                                           str(build_tiny_model(d)))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])  # the guard waits / the step is skipped
def test_a_nan_loss_stops_training_keeps_the_last_good_checkpoint_and_saves_no_adapter(tiny_model_dir, tmp_path,
                                                                                        monkeypatch, optim):
    from helpers.train.trainer import CourseTrainer

    real, calls = CourseTrainer.compute_loss, []

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        calls.append(1)
        if len(calls) == 3:  # the third forward: a loss that is not a number
            inputs = dict(inputs)
            model = _Poisoned(model)
        return real(self, model, inputs, return_outputs, num_items_in_batch)

    monkeypatch.setattr(CourseTrainer, "compute_loss", poisoned)
    w = make_work(tmp_path / "w")
    make_dataset(w.dataset, repeats=20)

    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        finite_after: dict = {}

        def on_step_end(self, args, state, control, model=None, **kw):
            lora = [p for n, p in model.named_parameters() if "lora_" in n]
            self.finite_after[state.global_step] = all(bool(torch.isfinite(p).all()) for p in lora)

    watch = Watch()
    watch.finite_after = {}
    with pytest.raises(TrainingDiverged, match=r"^training stopped at update 3: the loss became nan") as e:
        train(_short(tiny_model_dir, max_steps=5, extra={"optim": optim}), w, callbacks=[watch])
    # The plain optimizer stops before update 3's step; the fused one skips that step on the device (the weights
    # stay finite) and the guard reads its verdict one update later, without waiting for the GPU.
    assert watch.finite_after == ({1: True, 2: True} if optim == "adamw_torch" else {1: True, 2: True, 3: True})
    assert "checkpoint-2 is kept" in str(e.value) and "lr" in str(e.value) and "\n" not in str(e.value)
    assert [p.name for p in complete_checkpoints(w.checkpoints)] == ["checkpoint-2"]
    assert not w.adapter.exists()
    from safetensors.torch import load_file

    kept = load_file(str(w.checkpoints / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in kept.values())


def test_the_output_layers_adapter_trains_through_the_packed_loss(tiny_model_dir, tmp_path):
    """The tiny preset adapts the output layer; the packed loss must carry its gradient (a CUDA-only fault once)."""
    from safetensors.torch import load_file

    w = make_work(tmp_path / "w")
    make_dataset(w.dataset, repeats=30, general_ratio=0.2)
    result = train(_short(tiny_model_dir), w)
    adapter = load_file(str(w.adapter / "adapter_model.safetensors"))
    head_b = [k for k in adapter if "lm_head" in k and "lora_B" in k]
    assert head_b and all(adapter[k].abs().sum() > 0 for k in head_b)
    assert result["plan"]["loss"] == "chunked" and result["final_loss"] < result["first_loss"]


def test_one_place_decides_and_nothing_is_patched_onto_the_model():
    """The engine's structure: no file of the training package over ~400 lines; no assignment to a forward or a
    compiled call, no kit attribute hung on a model, no private Trainer member outside trainer.py's one line."""
    package = REPO_ROOT / "helpers" / "train"
    for path in package.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path
    for path in [*package.glob("*.py"), *(REPO_ROOT / "helpers").glob("*.py")]:
        text = path.read_text()
        assert not re.search(r"\.forward\s*=[^=]|_compiled_call_impl|_kit_trainer|through_wrapper", text), path
    private = re.findall(r"(?:self|trainer|arguments|args)\._[a-z]\w*", "".join(
        p.read_text() for p in package.glob("*.py")))
    assert private == ["arguments._n_gpu"]


def test_the_benchmarks_kit_recipe_is_notebook_02s_train(monkeypatch, tmp_path):
    import importlib.util

    from helpers.paths import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench", REPO_ROOT / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen = []

    def fake_train(config, work, callbacks=None):
        seen.append(config)
        return {"steps": 0}

    import helpers.train

    monkeypatch.setattr(helpers.train, "train", fake_train)
    bench.kit_train(tmp_path / "model", tmp_path / "w", quantization="nf4", rows=4, length=2048, steps=5)
    (config,) = seen
    assert isinstance(config, TrainConfig) and config.quantization == "nf4"
    assert (config.batch_size, config.gradient_accumulation, config.max_length, config.max_steps) == (4, 1, 2048, 5)




def test_the_one_private_member_the_engine_writes_still_works(tmp_path):
    """trainer.training_arguments sets TrainingArguments._n_gpu = 1 (one process, one GPU: several GPUs go through
    num_gpus, never DataParallel); a transformers upgrade that renames it must fail here, saying what to change."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert hasattr(args, "_n_gpu"), ("transformers no longer has TrainingArguments._n_gpu: change "
                                     "helpers/train/trainer.py's training_arguments to its new way of keeping n_gpu 1")
    args._n_gpu = 1
    assert args.n_gpu == 1, "TrainingArguments.n_gpu no longer reads _n_gpu: change helpers/train/trainer.py"
