"""Training on several processes (helpers.distributed): two CPU ranks over gloo train the same adapter as one
process, with the same loss and gradient norm at every update, write every file once, and resume after all
ranks are killed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers.data import make_dataset
from helpers.distributed import DistributedError, check, per_rank
from helpers.paths import REPO_ROOT, work as make_work
from helpers.train import TrainConfig, TrainConfigError, complete_checkpoints, evaluation_rounds, read_metrics, train


def _config(model_dir, **kw):
    # 2 rows per update: one process accumulates 2, two processes take one each. No dropout: the ranks' random
    # streams differ from one process's, and the comparison is exact.
    return dict(base_model=str(model_dir), max_steps=12, gradient_accumulation=2, save_steps=3, save_total_limit=2,
                evaluation_freq=6, max_new_tokens=4, max_length=96, logging_steps=1, lr=2e-3, lora_dropout=0.0,
                seed=5) | kw


def _adapter(w):
    from safetensors.torch import load_file

    return load_file(str(w.adapter / "adapter_model.safetensors"))


def test_two_ranks_train_the_one_process_adapter_and_resume_after_a_kill(tiny_model_dir, tmp_path):
    one, two = make_work(tmp_path / "one"), make_work(tmp_path / "two")
    for w in (one, two):
        make_dataset(w.dataset, repeats=40, general_ratio=0.2)
    kw = _config(tiny_model_dir)
    train(TrainConfig(**kw), one)

    # Two ranks through `python -m helpers train` (accelerate launch), killed, all of them, after a checkpoint.
    command = [sys.executable, "-m", "helpers", "train", "--work-dir", str(two.root), "--num-gpus", "2",
               "--config-json", json.dumps(kw)]
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not complete_checkpoints(two.checkpoints):
            assert proc.poll() is None, f"the two ranks ended before their first checkpoint: {proc.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert not two.adapter.exists()

    # Resumed, from the newest complete checkpoint.
    result = train(TrainConfig(**(kw | {"num_gpus": 2})), two)
    assert result["resumed_from"] and result["steps"] == 12 and result["hyper_parameters"]["num_gpus"] == 2
    assert result["answers_after"] == evaluation_rounds(two)[-1]["answers"]

    # Same rows in the same updates, loss and gradients on the same scale (a rank's loss is its share of the sum).
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(1, 13))  # one writer, no duplicates
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                   rel=1e-4), (a, b)
    w1, w2 = _adapter(one), _adapter(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)
    assert [r["step"] for r in evaluation_rounds(two)] == [0, 6, 12]
    assert [p.name for p in complete_checkpoints(two.checkpoints)] == ["checkpoint-9", "checkpoint-12"]
    assert not [p for p in two.checkpoints.iterdir() if p.name.startswith(".")]


def test_bad_settings_get_one_sentence():
    with pytest.raises(TrainConfigError, match="gradient_accumulation so that the product is a multiple of 2"):
        TrainConfig(num_gpus=2).resolved()  # the tiny preset's 1 x 1 rows per update cannot be shared by two
    with pytest.raises(TrainConfigError, match="distributed is 'zero3'; use 'ddp'"):
        TrainConfig(distributed="zero3").resolved()
    with pytest.raises(TrainConfigError, match="num_gpus is 0"):
        TrainConfig(num_gpus=0).resolved()
    with pytest.raises(DistributedError, match="cannot shard 4-bit"):
        check(_homework(TrainConfig(preset="homework", num_gpus=2, quantization="nf4", distributed="fsdp")), gpus=2)
    with pytest.raises(DistributedError, match="distributed='fsdp' needs CUDA GPUs"):  # not DDP under its name
        check(_homework(TrainConfig(preset="homework", num_gpus=2, distributed="fsdp")), gpus=0)
    with pytest.raises(DistributedError, match="shows 2 GPU"):
        check(_homework(TrainConfig(preset="homework", num_gpus=4)), gpus=2)
    if not _has("deepspeed"):
        with pytest.raises(DistributedError, match="pip install deepspeed"):
            check(_homework(TrainConfig(preset="homework", num_gpus=2, distributed="zero2")), gpus=2)


def test_the_update_keeps_the_course_size():
    hw = _homework(TrainConfig(preset="homework"))
    for gpus in (1, 2, 4, 8, 16):
        c = per_rank(hw, gpus)
        assert c.batch_size * c.gradient_accumulation * gpus == 16


def _homework(cfg):
    import dataclasses

    from helpers.train import PRESETS

    return dataclasses.replace(cfg, **{k: v for k, v in PRESETS["homework"].items() if getattr(cfg, k, None) is None})


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _tiny_packed_model():
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers.train.packed import PackedCausalLM, use_kit_attention
    from helpers.train.plan import TrainingPlan

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                         tie_word_embeddings=False))
    use_kit_attention(model)
    return PackedCausalLM(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                            init_lora_weights=False), TrainingPlan())


def _packed_batch(offset: int):
    from helpers.train.data import Collator

    ids = [(i * 7 + offset) % 90 + 3 for i in range(24)]
    return Collator(0)([{"input_ids": ids, "labels": ids, "position_ids": [i % 12 for i in range(24)]}])


def _ranks_average_through_the_wrapper(out_dir: str) -> None:
    """One rank: the packed model in DDP, its loss its own forward, so DDP's gradient averaging is armed."""
    from accelerate import PartialState

    state = PartialState(cpu=True)
    torch.set_num_threads(1)  # a forked rank must not enter the parent's OpenMP pool (it would wait forever)
    model = _tiny_packed_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = _packed_batch(state.process_index)  # each rank its own rows
    ddp(**batch).loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    torch.save(grads, f"{out_dir}/grad{state.process_index}.pt")
    model.zero_grad()
    model(**batch).loss.backward()  # the model called without its wrapper: no averaging
    torch.save([p.grad.clone() for p in model.parameters() if p.requires_grad], f"{out_dir}/alone{state.process_index}.pt")


def test_the_packed_loss_goes_through_the_wrapper(tmp_path):
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # what an earlier training in this process left
    debug_launcher(_ranks_average_through_the_wrapper, (str(tmp_path),), num_processes=2)
    grads = [torch.load(tmp_path / f"grad{r}.pt") for r in (0, 1)]
    alone = [torch.load(tmp_path / f"alone{r}.pt") for r in (0, 1)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)  # averaged over the ranks
    for g, a0, a1 in zip(grads[0], *alone):
        torch.testing.assert_close(g, (a0 + a1) / 2)
    assert not all(torch.equal(a, b) for a, b in zip(*alone))  # the check can fail: each rank's own differ


SHARDED_RANK = """
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from tests.test_distributed import _packed_batch, _tiny_packed_model
from helpers.train.trainer import CourseTrainer

dist.init_process_group("gloo")
model = _tiny_packed_model()
batch = _packed_batch(0)
alone = float(model(**batch).loss)
mixed = copy.deepcopy(model)
alone16 = float(copy.deepcopy(model).to(torch.bfloat16)(**batch).loss)
lm = model.get_base_model()
for unit in [*lm.model.layers, lm.lm_head]:  # the output layer its own unit, as accelerate's FSDP2 may
    fully_shard(unit)  # make it: its weight is gathered only when the layer itself is called
fully_shard(model)
assert hasattr(lm.lm_head.weight, "full_tensor")  # at rest the output layer's weight is this rank's shard
sharded = model(**batch).loss
sharded.backward()

# accelerate's FSDP2 with bf16 (Trainer bf16=True): its policy and units (the tail is the final norm with the head)
bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, output_dtype=torch.bfloat16)
lm16 = mixed.get_base_model()
for unit in [*lm16.model.layers, lm16.model.embed_tokens]:
    fully_shard(unit, mp_policy=bf16)
fully_shard([lm16.model.norm, lm16.lm_head], mp_policy=bf16, reshard_after_forward=False)
fully_shard(mixed, mp_policy=bf16)


class _Args:
    average_tokens_across_devices = False


class _Trainer:  # the Trainer's compute_loss, on its own
    args, tokens_seen, update_loss = _Args(), 0, 0.0
    accelerator = type("A", (), {"num_processes": 1})()


loss16 = CourseTrainer.compute_loss(_Trainer(), mixed, batch)
loss16.backward()
grad = lm16.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad
torch.save({"losses": torch.tensor([alone, float(sharded.detach()), alone16, float(loss16.detach())],
                                   dtype=torch.float64),
            "dtype16": str(loss16.dtype), "grad16": bool(grad is not None and grad.full_tensor().abs().sum() > 0)},
           f"{sys.argv[1]}/loss{dist.get_rank()}.pt")
dist.barrier()
sys.stdout.flush()
os._exit(0)  # both ranks' figures are saved; gloo's teardown after FSDP can abort the process on exit
"""


@pytest.fixture(scope="module")
def sharded_figures(tmp_path_factory):
    """Two fresh CPU ranks (torchrun, gloo), run once for the tests below: each rank's figures."""
    out = tmp_path_factory.mktemp("sharded")
    script = out / "rank.py"
    script.write_text(SHARDED_RANK, encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out)], env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"loss{r}.pt") for r in (0, 1)]


def test_the_fused_loss_reads_a_sharded_output_layer(sharded_figures):
    """A tiny Llama sharded with FSDP2 takes the kit's packed loss."""
    for figures in sharded_figures:
        alone, sharded = figures["losses"][:2].tolist()
        assert sharded == pytest.approx(alone, rel=1e-5)


def test_fsdp_in_bf16_reports_the_float32_loss(sharded_figures):
    """accelerate's FSDP2 bf16 policy casts the root's output to bf16 (output_dtype): the loss through the wrapper
    is still float32, the bf16 model's own loss (not that loss rounded to bf16's 3 digits), and it trains."""
    for figures in sharded_figures:
        alone16, loss16 = figures["losses"][2:].tolist()
        assert figures["dtype16"] == "torch.float32" and figures["grad16"]
        assert loss16 == pytest.approx(alone16, abs=2e-3)
        assert loss16 != float(torch.tensor(loss16).to(torch.bfloat16))  # the check can fail: not a bf16 value
