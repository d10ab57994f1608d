"""The fast path computes the same loss as the plain recipe: packing, attention boundaries, chunked CE."""
import random
from types import SimpleNamespace

import pytest
import torch

from helpers import fast_path as fp


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=256, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def _samples(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(5, 17)
        ids = [rng.randrange(1, 97) for _ in range(length)]
        answer = rng.randint(2, length - 1)
        out.append({"input_ids": ids, "labels": [-100] * (length - answer) + ids[length - answer:]})
    return out


def _plain_loss(model, samples):
    """The plain recipe: each sample alone, HF's own shifted CE, averaged over all trained tokens."""
    total, count = 0.0, 0
    for s in samples:
        ids = torch.tensor([s["input_ids"]])
        labels = torch.tensor([s["labels"]])
        logits = model(input_ids=ids).logits[0, :-1].double()
        target = labels[0, 1:]
        keep = target != -100
        total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        count += int(keep.sum())
    return total / count


def test_chunked_loss_equals_plain_cross_entropy_and_its_gradient():
    torch.manual_seed(1)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    target = torch.randint(0, 50, (37,))
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), target, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, hidden)
    got = fp.FusedLinearCrossEntropy.apply(hidden, weight, target, 8)  # 5 chunks, the last one short
    (g_got,) = torch.autograd.grad(got * 3.0, hidden)
    assert torch.allclose(got, ref, rtol=1e-10)
    assert torch.allclose(g_got, 3.0 * g_ref, rtol=1e-8, atol=1e-10)


def test_packed_padding_free_loss_equals_separate_forwards():
    model = _tiny_llama()
    fp.use_kit_attention(model)
    samples = _samples(9)
    rows = fp.pack_examples(samples, tokens_per_row=48, seed=3)
    assert sum(len(r) for r in rows) == 9 and len(rows) > 1
    assert all(sum(len(s["input_ids"]) for s in r) <= 48 for r in rows)
    n = sum(1 for s in samples for lab in s["labels"][1:] if lab != -100)
    total = 0.0
    with torch.no_grad():
        for r in rows:
            batch = fp.collate_packed(r, pad_to=48)
            total += float(fp.packed_loss(model, batch, normalizer=n).detach())
    assert total == pytest.approx(float(_plain_loss(model, samples)), rel=1e-4)


def test_samples_in_one_row_do_not_see_each_other():
    model = _tiny_llama()
    fp.use_kit_attention(model)
    a, b = _samples(2, seed=5)
    decoder = model.get_decoder()
    with torch.no_grad():
        batch = fp.collate_packed([a, b])
        kw = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
        packed = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kw).last_hidden_state
        alone = decoder(input_ids=torch.tensor([b["input_ids"]])).last_hidden_state
    assert torch.allclose(packed[0, len(a["input_ids"]):], alone[0], atol=1e-5)
    assert batch["position_ids"][0, len(a["input_ids"])] == 0


def test_plan_follows_the_gpu():
    big = fp.make_plan(gpu_memory_gib=139, bf16=True, has_4bit=True)
    assert (big.precision, big.gradient_checkpointing, big.tokens_per_step * big.accumulation) == ("bf16", False, 16384)
    small = fp.make_plan(gpu_memory_gib=8, bf16=True, has_4bit=True)
    assert (small.precision, small.gradient_checkpointing, small.tokens_per_step) == ("nf4", True, 2048)
    assert small.tokens_per_step * small.accumulation == 16384
    lean = fp.make_plan("lean", gpu_memory_gib=139, bf16=True, has_4bit=True)
    assert lean.precision == "nf4"
    cpu = fp.make_plan(gpu_memory_gib=0)
    assert cpu.precision == "fp32" and cpu.device == "cpu"
    with pytest.raises(ValueError, match="preset"):
        fp.make_plan("turbo", gpu_memory_gib=8)


def test_flops_count_matches_the_1_8b_shape():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=92544)
    # 24 layers x 62.9M + head 189.5M matmul weights = 1.6995B; 4N = 6.80 GFLOP per token before attention
    assert fp.flops_per_token(cfg, 0) == pytest.approx(4 * 1_699_479_552, rel=1e-9)
    assert fp.mean_causal_context([3]) == pytest.approx(2.0)


def test_trainer_batch_becomes_the_same_packed_loss():
    """helpers.train's packed rows (position_ids) give the same loss through the fast path as HF's own."""
    model = _tiny_llama()
    samples = _samples(6, seed=9)
    ids = [t for s in samples for t in s["input_ids"]]
    labels = [t for s in samples for t in s["labels"]]
    pos = [p for s in samples for p in range(len(s["input_ids"]))]
    inputs = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos])}
    n = sum(1 for s in samples for lab in s["labels"][1:] if lab != -100)
    with torch.no_grad():
        fast = float(fp.packed_trainer_loss(model, inputs, n))
    assert model.config._attn_implementation == "sdpa"  # switched back after the forward
    assert fast == pytest.approx(float(_plain_loss(model, samples)), rel=1e-4)


def test_trainer_fast_path_fp32_adapters_fixed_shapes_same_loss():
    """helpers.train's Trainer on the fast path: fp32 adapters, rows padded to a fixed size, the same loss."""
    from peft import LoraConfig, get_peft_model

    from helpers.train import Collator, make_collator, pack_samples

    model = _tiny_llama()
    samples = _samples(10, seed=4)
    plain = float(_plain_loss(model, samples))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    plan = fp.FastPlan(precision="bf16", tokens_per_step=3 * 48)
    model = fp.prepare_trainer_model(model, plan, max_length=48)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float32
    rows = pack_samples(samples, 48, seed=1)
    inputs = Collator(0)(rows[:2])
    assert inputs["input_ids"].numel() < plan.tokens_per_step  # the loss pads the flat row up to it
    batch = fp.batch_from_positions(inputs, plan.tokens_per_step, 48)
    assert batch["input_ids"].shape == (1, 144) and batch["max_length_q"] == 64
    assert int((batch["cu_seq_lens_q"][1:] - batch["cu_seq_lens_q"][:-1]).max()) <= 48
    n = sum(1 for r in rows[:2] for lab in r["labels"][1:] if lab != -100)
    rest = sum(1 for r in rows[2:] for lab in r["labels"][1:] if lab != -100)
    first = fp.packed_trainer_loss(model, inputs, n)
    first.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    with torch.no_grad():
        second = float(fp.packed_trainer_loss(model, Collator(0)(rows[2:]), rest))
    assert (float(first) * n + second * rest) / (n + rest) == pytest.approx(plain, rel=1e-4)
    # The Trainer's collator lays the rows out flat on the CPU (no GPU sync for the indices): the same loss, and
    # the token count may stay a tensor (as the Trainer hands it over on a GPU).
    flat = make_collator(SimpleNamespace(pad_token_id=0), model)(rows[2:])
    assert flat["varlen"]["keep"].numel() == rest and flat["varlen"]["max_length_q"] == 64
    with torch.no_grad():
        again = fp.packed_trainer_loss(model, flat, torch.tensor(rest))
    assert float(again) == pytest.approx(second, rel=1e-6)


def test_trainer_rows_per_forward_keep_the_update():
    assert fp.trainer_batches(16384, 1024, 1, 16) == (16, 1)
    assert fp.trainer_batches(2048, 1024, 1, 16) == (2, 8)
    assert fp.trainer_batches(4096, 1024, 1, 6) == (3, 2)  # rows per forward divide the rows per update
    assert fp.trainer_batches(16384, 1024, 2, 4) == (4, 1)
    assert fp.trainer_batches(512, 1024, 2, 8) == (2, 4)  # never fewer than the configured batch
