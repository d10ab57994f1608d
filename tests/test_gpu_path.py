"""The GPU training path, checked on the CPU: the fast path forced on (its loss, adapters, modes), the NaN guard,
the plan's choices for given card sizes, and that the benchmark's kit recipe is notebook 02's train()."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import fast_path as fp
from helpers.data import make_dataset
from helpers.paths import work as make_work
from helpers.train import TrainConfig, TrainingDiverged, complete_checkpoints, train

REAL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=8, vocab_size=92544, tie_word_embeddings=False)


def _short(model_dir, **kw):
    return TrainConfig(**(dict(base_model=str(model_dir), max_steps=3, save_steps=2, evaluation_freq=100,
                               max_new_tokens=4, max_length=96, logging_steps=1, resume=False) | kw))


def _adapter(w):
    from safetensors.torch import load_file

    return load_file(str(w.adapter / "adapter_model.safetensors"))


@pytest.fixture
def forced_fast_path(monkeypatch):
    """The GPU routing on the CPU: helpers.train gets a plan, so packed rows go through the kit's loss."""
    def plan(config, quantization, model_config=None, **kw):
        p = fp.FastPlan(device="cpu", precision="fp32", tokens_per_step=2 * config.max_length, loss_chunk=7,
                        reason="forced on the CPU for a test")
        p.extras = {"batch_size": config.batch_size, "gradient_accumulation": config.gradient_accumulation}
        return p

    monkeypatch.setattr(fp, "trainer_plan", plan)


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir, tmp_path_factory):
    """The tiny preset (output-layer adapter on) for 3 updates on the plain (CPU) path."""
    w = make_work(tmp_path_factory.mktemp("plain"))
    make_dataset(w.dataset, repeats=30, general_ratio=0.2)
    return w, train(_short(tiny_model_dir), w)


def test_output_layer_adapter_trains_on_the_fast_path_as_on_the_plain_one(tiny_model_dir, tmp_path, plain_run,
                                                                           forced_fast_path):
    plain_work, plain = plain_run
    w = make_work(tmp_path / "fast")
    make_dataset(w.dataset, repeats=30, general_ratio=0.2)
    fast = train(_short(tiny_model_dir), w)
    assert fast["fast_path"]["reason"] == "forced on the CPU for a test"
    a, b = _adapter(plain_work), _adapter(w)
    head_b = [k for k in b if "lm_head" in k and "lora_B" in k]
    assert head_b and all(b[k].abs().sum() > 0 for k in head_b)  # the output layer's adapter got gradients
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-3)
    assert fast["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-3)
    model = fast["model"]
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert model.get_base_model().config._attn_implementation != fp.ATTENTION_NAME  # back to generation mode


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])  # the guard waits / the step is skipped
def test_a_nan_loss_stops_training_keeps_the_last_good_checkpoint_and_saves_no_adapter(tiny_model_dir, tmp_path,
                                                                                        monkeypatch, optim):
    import helpers.train as train_module

    real, calls = train_module.compute_loss, []

    def poisoned(model, inputs, num_items_in_batch=None):
        loss, out = real(model, inputs, num_items_in_batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), out

    monkeypatch.setattr(train_module, "compute_loss", poisoned)
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
    # the kit's adapters on a bf16 model are fp32 (and AdamW's states follow them)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50)).bfloat16()
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]), autocast_adapter_dtype=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    model = fp.prepare_trainer_model(model, fp.FastPlan(tokens_per_step=64), max_length=32)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("quantization,memory,expected", [
    # (precision, recomputation, rows per forward, forwards per update) for the homework (16 rows of 1024)
    ("auto", 141, ("bf16", False, 16, 1)), ("auto", 80, ("bf16", False, 16, 1)),
    ("auto", 24, ("bf16", False, 4, 4)), ("auto", 8, ("nf4", True, 8, 2)),
    ("nf4", 141, ("nf4", False, 16, 1)), ("nf4", 24, ("nf4", False, 4, 4)), ("nf4", 8, ("nf4", True, 8, 2)),
])
def test_the_plan_fits_the_card(quantization, memory, expected):
    from transformers import LlamaConfig

    config = TrainConfig(preset="homework", quantization=quantization).resolved()
    plan = fp.trainer_plan(config, quantization, LlamaConfig(**REAL), memory_gib=memory, cuda=True, bf16=True)
    assert (plan.precision, plan.gradient_checkpointing, plan.extras["batch_size"], plan.accumulation) == expected
    assert plan.extras["batch_size"] * plan.accumulation == 16  # the course's update, whatever the card
    assert plan.extras["estimate_gib"] <= 0.9 * memory
    assert plan.loss_chunk == (4096 if memory >= 40 else 1024)
    assert plan.compile_layers == (plan.precision == "bf16")


def test_the_plan_says_when_nothing_fits():
    from transformers import LlamaConfig

    config = TrainConfig(preset="homework", quantization="nf4").resolved()
    plan = fp.trainer_plan(config, "nf4", LlamaConfig(**REAL), memory_gib=3, cuda=True, bf16=True)
    assert (plan.precision, plan.gradient_checkpointing, plan.extras["batch_size"]) == ("nf4", True, 1)
    assert "does not fit" in plan.reason
    assert fp.trainer_plan(config, "nf4", LlamaConfig(**REAL), memory_gib=24, cuda=False) is None


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


@pytest.mark.parametrize("updates,fused", [(74, True), (fp.COMPILE_MIN_UPDATES, False)])
def test_eager_layers_get_ligers_fused_kernels_and_compiled_ones_do_not(tiny_model_dir, monkeypatch, updates, fused):
    """The homework's 74 updates run eager layers: Liger's RMSNorm / SwiGLU / RoPE kernels go in (the model's
    own modules, the kit's loss kept); a run long enough to compile keeps its compiled layers instead."""
    import sys
    import types

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    calls = []
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", _stand_in_liger(calls))
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setattr(fp, "_has", lambda module: module == "liger_kernel")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    plan = fp.FastPlan(device="cuda", precision="bf16", compile_layers=True, reason="r, compiled layers, x.")
    model = fp.prepare_trainer_model(model, plan, max_length=32)
    fp.fit_layers_to_run(model, updates)
    assert bool(calls) == fused and plan.compile_layers != fused
    assert plan.kernels == ("liger" if fused else "torch")
    if fused:
        (kw,) = calls
        assert kw["model"] is model.get_base_model() and kw["swiglu"] and kw["rms_norm"] and kw["rope"]
        assert not kw["fused_linear_cross_entropy"] and not kw["cross_entropy"]  # the kit's loss stays
        assert "Liger" in plan.reason and "compiled" not in plan.reason


def test_ligers_kernels_that_cannot_run_leave_the_plain_layers_with_one_sentence(tiny_model_dir, monkeypatch,
                                                                                 capsys):
    """Triton builds its launchers with the machine's C compiler: without one (or with any other failure of the
    kernel) the kit says so in one sentence and trains on the plain eager layers."""
    import sys
    import types

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    calls = []
    broken = RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", _stand_in_liger(calls, broken))
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setattr(fp, "_has", lambda module: module == "liger_kernel")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    plan = fp.FastPlan(device="cuda", precision="nf4", reason="r.")
    model = fp.prepare_trainer_model(model, plan, max_length=32)
    fp.fit_layers_to_run(model, 74)
    assert calls == [] and plan.kernels == "torch" and "Liger" not in plan.reason
    out = capsys.readouterr().out.strip()
    assert out == ("note: Liger's kernels do not work here (RuntimeError: Failed to find C compiler. Please specify "
                   "via CC environment variable.); training goes on with the plain eager layers (uninstall "
                   "liger-kernel to skip this check).")
    assert fp.fused_kernels_fail("cpu").startswith("RuntimeError: Failed to find C compiler")
    wrong = _stand_in_liger([])
    wrong.LigerRMSNorm = lambda hidden, eps: torch.nn.Identity()  # a kernel that runs but leaves its input as is
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", wrong)
    assert "from the formula" in fp.fused_kernels_fail("cpu")
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", _stand_in_liger([]))
    assert fp.fused_kernels_fail("cpu") is None


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


def test_the_plans_estimate_meets_the_measured_peak():
    """H200, 1.8B dims, the homework's 16 rows of 1024 in one forward, eager bf16 layers: 61.6 GiB measured."""
    from transformers import LlamaConfig

    config = TrainConfig(preset="homework", quantization="auto").resolved()
    plan = fp.trainer_plan(config, "auto", LlamaConfig(**REAL), memory_gib=139.8, cuda=True, bf16=True)
    assert plan.extras["batch_size"] == 16
    assert plan.extras["estimate_gib"] == pytest.approx(61.6, rel=0.05)
