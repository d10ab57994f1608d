"""The packed model computes the same loss as the plain recipe: packing, attention boundaries, chunked CE, and
the collator's flat row; PackedCausalLM's forward is that loss, through any wrapper."""
import random

import pytest
import torch

from helpers.train import packed as pk
from helpers.train.data import Collator, pack_samples
from helpers.train.plan import TrainingPlan, flops_per_token, mean_causal_context, split_update

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
    got = pk.fused_cross_entropy(hidden, weight, target, 8)  # 5 chunks, the last one short
    (g_got,) = torch.autograd.grad(got * 3.0, hidden)
    assert torch.allclose(got, ref, rtol=1e-10)
    assert torch.allclose(g_got, 3.0 * g_ref, rtol=1e-8, atol=1e-10)


def _rows(samples):
    return [dict(s, position_ids=list(range(len(s["input_ids"])))) for s in samples]


def test_packed_padding_free_loss_equals_separate_forwards():
    model = _tiny_llama()
    pk.use_kit_attention(model)
    samples = _samples(9)
    rows = pack_samples(samples, 48, seed=3)
    assert sum(r["position_ids"].count(0) for r in rows) == 9 and len(rows) > 1
    assert all(len(r["input_ids"]) <= 48 for r in rows)
    n = sum(1 for s in samples for lab in s["labels"][1:] if lab != -100)
    total = 0.0
    with torch.no_grad():
        for r in rows:
            batch = Collator(0, pad_to=48, max_seq=48)([r])
            total += float(pk.packed_loss(model, batch, normalizer=n))
    assert total == pytest.approx(float(_plain_loss(model, samples)), rel=1e-4)


def test_samples_in_one_row_do_not_see_each_other():
    model = _tiny_llama()
    pk.use_kit_attention(model)
    a, b = _samples(2, seed=5)
    decoder = model.get_decoder()
    with torch.no_grad():
        batch = Collator(0)([
            {"input_ids": a["input_ids"] + b["input_ids"], "labels": a["labels"] + b["labels"],
             "position_ids": list(range(len(a["input_ids"]))) + list(range(len(b["input_ids"])))}])
        kw = {k: batch[k] for k in pk.PACKED_KEYS}
        packed = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kw).last_hidden_state
        alone = decoder(input_ids=torch.tensor([b["input_ids"]])).last_hidden_state
    assert torch.allclose(packed[0, len(a["input_ids"]):], alone[0], atol=1e-5)
    assert batch["position_ids"][0, len(a["input_ids"])] == 0


def test_generation_through_the_kit_attention_is_the_models_own():
    """The packed attention stays on the model after training: unpacked calls (answers, padded batches) must be
    what the model's own SDPA attention gives."""
    model = _tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 3, 4, 5, 6]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).logits
        pk.use_kit_attention(model)
        kit = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(own, kit, atol=1e-5)


def test_flops_count_matches_the_1_8b_shape():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=92544)
    # 24 layers x 62.9M + head 189.5M matmul weights = 1.6995B; 4N = 6.80 GFLOP per token before attention
    assert flops_per_token(cfg, 0) == pytest.approx(4 * 1_699_479_552, rel=1e-9)
    assert mean_causal_context([3]) == pytest.approx(2.0)


def test_the_packed_models_forward_is_the_loss_with_fp32_adapters_and_fixed_shapes():
    """PackedCausalLM: fp32 adapters, rows padded to a fixed size, the collator's flat row, the same loss as the
    plain recipe; its forward without targets is the PEFT model's own."""
    from peft import LoraConfig

    model = _tiny_llama()
    samples = _samples(10, seed=4)
    plain = float(_plain_loss(model, samples))
    pk.use_kit_attention(model)
    plan = TrainingPlan(pad_to=3 * 48, max_seq=48)
    model = pk.PackedCausalLM(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                task_type="CAUSAL_LM"), plan)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    rows = pack_samples(samples, 48, seed=1)
    collate = Collator(0, plan.pad_to, plan.max_seq)
    first_batch, rest_batch = collate(rows[:2]), collate(rows[2:])
    assert first_batch["input_ids"].shape == (1, 144) and first_batch["max_length_q"] == 64
    assert int((first_batch["cu_seq_lens_q"][1:] - first_batch["cu_seq_lens_q"][:-1]).max()) <= 48
    n = sum(1 for r in rows[:2] for lab in r["labels"][1:] if lab != -100)
    rest = sum(1 for r in rows[2:] for lab in r["labels"][1:] if lab != -100)
    assert first_batch["keep"].numel() == n and rest_batch["keep"].numel() == rest
    first = model(**first_batch, num_items_in_batch=torch.tensor(n)).loss
    first.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    with torch.no_grad():
        second = float(model(**rest_batch, num_items_in_batch=rest).loss)
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits  # no targets: the model's own forward
    assert logits.shape == (1, 3, 97)
    assert (float(first) * n + second * rest) / (n + rest) == pytest.approx(plain, rel=1e-4)


def test_rows_per_forward_keep_the_update():
    assert split_update(16, 1, 16) == (16, 1)
    assert split_update(2, 1, 16) == (2, 8)
    assert split_update(4, 1, 6) == (3, 2)  # rows per forward divide the rows per update
    assert split_update(16, 2, 4) == (4, 1)
    assert split_update(0, 2, 8) == (2, 4)  # never fewer than the configured batch


def test_compiled_layers_that_fail_fall_back_to_eager_with_one_sentence(monkeypatch, capsys):
    """Inductor needs a C compiler and a supported device: where compiling fails, the run goes on eagerly."""
    from peft import LoraConfig

    model = _tiny_llama()
    pk.use_kit_attention(model)
    model = pk.PackedCausalLM(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
                              TrainingPlan(layers="compiled"))
    batch = Collator(0)(pack_samples(_samples(4, seed=2), 64, seed=0)[:1])
    real, calls = pk.packed_loss, []

    def first_fails(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("Failed to find C compiler."), None)
        return real(*a, **k)

    monkeypatch.setattr(pk, "packed_loss", first_fails)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and len(calls) == 2 and "C compiler" in model.compile_failed
    out = capsys.readouterr().out.strip()
    assert out.startswith("note: compiling the layers failed (RuntimeError: Failed to find C compiler.)") and "\n" not in out
    assert out.endswith("training goes on with eager layers.")
