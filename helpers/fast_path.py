"""The kit's fast and lean training path for a GPU (it also runs, slowly but exactly, on a CPU).

Three things the ecosystem does not do for us, each measured in benchmarks/:
- padding-free packing: short samples are laid end to end in one row, every sample keeps its own
  positions (RoPE restarts at 0) and attends only to itself (varlen attention with cu_seq_lens);
- no full-vocabulary fp32 logits: the loss is computed chunk by chunk on the trained positions only,
  and the gradient of each chunk is formed right away (a fused linear cross-entropy);
- tokens per step sized to the GPU at the course's effective batch (16 packs of 1024 tokens per
  optimizer step): a big GPU does it in one forward, a small one accumulates.
Precision is picked from the GPU: bf16 LoRA without recomputation where memory is plenty, 4-bit NF4
with gradient checkpointing where it is not (the "lean" preset).
"""
from __future__ import annotations

import importlib.util
import inspect
import random
from dataclasses import asdict, dataclass, field

ATTENTION_NAME = "kit_varlen"
COURSE_EFFECTIVE_TOKENS = 16 * 1024  # the course's packed batch: 16 x max_length 1024 per optimizer step
IGNORE = -100


# ---------------------------------------------------------------- the plan
@dataclass
class FastPlan:
    """How the kit trains on this machine; `reason` says why, in one sentence."""

    device: str = "cpu"
    precision: str = "fp32"           # "bf16" (LoRA on bf16 weights), "nf4" (4-bit QLoRA), "fp32" (CPU)
    gradient_checkpointing: bool = False
    tokens_per_step: int = 2048       # tokens in one forward (one packed row)
    accumulation: int = 1             # forwards per optimizer step
    attention: str = "sdpa"           # "varlen" (torch flash varlen) or "sdpa" (block-diagonal mask)
    loss: str = "chunked"             # "chunked" (the kit's fused linear CE) or "liger"
    loss_chunk: int = 4096            # rows of logits alive at once
    kernels: str = "torch"            # "liger": fused RMSNorm / SwiGLU / RoPE Triton kernels (when installed)
    compile_layers: bool = False
    reason: str = ""
    extras: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def varlen_available() -> bool:
    """torch's own flash-attention varlen kernel (no extra package) on a CUDA GPU of compute capability >= 8."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability(0)[0] < 8:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except Exception:
        return False
    return True


def make_plan(preset: str = "auto", gpu_memory_gib: float | None = None, bf16: bool | None = None,
              has_4bit: bool | None = None, effective_tokens: int = COURSE_EFFECTIVE_TOKENS,
              pack_length: int = 2048) -> FastPlan:
    """Pick precision, recomputation and tokens per forward for this GPU (`preset`: auto, fast, lean).

    Activation memory per token (bf16, 1.8B Llama-like model): about 2.4 MB without gradient checkpointing
    and 0.1 MB with it; the plan keeps activations under ~40% of the card after the weights.
    """
    import torch

    cuda = torch.cuda.is_available()
    if gpu_memory_gib is None:
        gpu_memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0
    if bf16 is None:
        bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    if has_4bit is None:
        has_4bit = bool(cuda and _has("bitsandbytes"))
    if preset not in ("auto", "fast", "lean"):
        raise ValueError(f"fast-path preset {preset!r} is unknown; use 'auto', 'fast' or 'lean'.")
    if gpu_memory_gib <= 0:
        return FastPlan(reason="no CUDA GPU: fp32 LoRA, packed rows with a block-diagonal mask (exact, not fast).",
                        tokens_per_step=pack_length, accumulation=max(1, effective_tokens // pack_length))
    attention = "varlen" if (cuda and varlen_available()) or not cuda else "sdpa"
    loss = "chunked"
    kernels = "liger" if cuda and _has("liger_kernel") else "torch"
    lean = preset == "lean" or (preset == "auto" and (gpu_memory_gib < 40 or not bf16) and has_4bit)
    if lean and has_4bit:
        # 4-bit weights (~1 GiB for 1.8B) and recomputed layers: 2048-token packs fit in ~4 GiB.
        per_step = pack_length if gpu_memory_gib < 12 else min(effective_tokens, 8 * pack_length)
        return FastPlan(device="cuda", precision="nf4", gradient_checkpointing=True, tokens_per_step=per_step,
                        accumulation=max(1, effective_tokens // per_step), attention=attention, loss=loss,
                        loss_chunk=1024, kernels=kernels,
                        reason=f"{gpu_memory_gib:.0f} GiB GPU: 4-bit NF4 weights, recomputed layers, "
                               f"{per_step} tokens per forward x {max(1, effective_tokens // per_step)}.")
    # bf16 weights (~3.7 GiB for 1.8B) and no recomputation: ~2.4 MB of activations per token.
    budget = max(0.0, gpu_memory_gib * 0.4 - 4)
    per_step = effective_tokens
    checkpointing = False
    while per_step > pack_length and per_step * 2.4e-3 > budget:
        per_step //= 2
    if per_step * 2.4e-3 > budget:
        checkpointing = True
    dtype = "bf16" if bf16 else "fp16"
    # 16-bit layers compile well (norms, RoPE, SwiGLU, LoRA scaling fused): measured faster than Liger's kernels.
    return FastPlan(device="cuda", precision=dtype, gradient_checkpointing=checkpointing, tokens_per_step=per_step,
                    accumulation=max(1, effective_tokens // per_step), attention=attention, loss=loss,
                    kernels="torch", compile_layers=True, reason=f"{gpu_memory_gib:.0f} GiB GPU: {dtype} LoRA, "
                           f"{'recomputed' if checkpointing else 'stored'} activations, {per_step} tokens per "
                           f"forward x {max(1, effective_tokens // per_step)}.")


# ---------------------------------------------------------------- packing
def shift_targets(labels: list[int]) -> list[int]:
    """Target of position t is the label of t+1 in the same sample; the last position predicts nothing."""
    return list(labels[1:]) + [IGNORE]


def pack_examples(examples: list[dict], tokens_per_row: int, seed: int | None = 0) -> list[list[dict]]:
    """Greedy padding-free packing: samples (in a seeded shuffle) fill rows of at most tokens_per_row tokens."""
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    rows, row, used = [], [], 0
    for i in order:
        ex = examples[i]
        n = min(len(ex["input_ids"]), tokens_per_row)
        if row and used + n > tokens_per_row:
            rows.append(row)
            row, used = [], 0
        row.append({"input_ids": list(ex["input_ids"][:n]), "labels": list(ex["labels"][:n])})
        used += n
    if row:
        rows.append(row)
    return rows


def collate_packed(samples: list[dict], pad_to: int | None = None, pad_id: int = 0, device=None) -> dict:
    """One packed row -> tensors: input_ids/position_ids/targets of shape (1, T) and the varlen boundaries."""
    import torch

    ids, pos, tgt, lengths = [], [], [], []
    for s in samples:
        n = len(s["input_ids"])
        ids += s["input_ids"]
        pos += range(n)
        tgt += shift_targets(s["labels"])
        lengths.append(n)
    longest = ceil_div(max(lengths), 64) * 64  # a stable bound for the kernels (and for torch.compile)
    if pad_to is not None and pad_to > len(ids):
        extra = pad_to - len(ids)  # the tail: more "samples" that predict nothing (fixed shapes)
        ids += [pad_id] * extra
        tgt += [IGNORE] * extra
        while extra > 0:
            n = min(extra, longest)
            pos += range(n)
            lengths.append(n)
            extra -= n
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    cu_t = t(cu, torch.int32)
    return {"input_ids": t(ids)[None], "position_ids": t(pos)[None], "targets": t(tgt)[None],
            "cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t, "max_length_q": longest, "max_length_k": longest}


# ---------------------------------------------------------------- attention
def _varlen_call():
    """torch's varlen_attn with causal masking, whatever the keyword is called in this torch version."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        causal = {"is_causal": True}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    else:
        raise RuntimeError("this torch's varlen_attn takes no causal flag")
    return varlen_attn, causal, "enable_gqa" in params


def _block_causal_mask(cu, total, device):
    import torch

    seg = torch.zeros(total, dtype=torch.long, device=device)
    seg[cu[1:-1].long()] = 1
    seg = seg.cumsum(0)
    idx = torch.arange(total, device=device)
    return (seg[:, None] == seg[None, :]) & (idx[:, None] >= idx[None, :])


_VARLEN = {"ok": True, "why": ""}


def kit_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over one packed row: each sample attends only to itself (causal)."""
    import torch
    import torch.nn.functional as F

    cu = kwargs.get("cu_seq_lens_q")
    b, hq, t, d = query.shape
    hk = key.shape[1]
    if cu is None or b != 1:  # not a packed call (e.g. generation): plain causal SDPA
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             is_causal=attention_mask is None and t > 1, enable_gqa=hq != hk)
        return out.transpose(1, 2).contiguous(), None
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and _VARLEN["ok"]:
        try:
            fn, causal, gqa = _varlen_call()
        except Exception as e:  # an older torch: the exact (slower) masked SDPA below
            _VARLEN.update(ok=False, why=f"{type(e).__name__}: {e}")
            return kit_varlen_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
        if hq != hk and not gqa:
            k, v = (x.repeat_interleave(hq // hk, dim=1) for x in (k, v))
        extra = {"enable_gqa": True} if (hq != hk and gqa) else {}
        out = fn(q, k, v, cu, kwargs.get("cu_seq_lens_k", cu), int(kwargs["max_length_q"]),
                 int(kwargs.get("max_length_k", kwargs["max_length_q"])), scale=scaling, **causal, **extra)
        return out[None], None  # (1, T, H, D)
    mask = _block_causal_mask(cu, t, query.device)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=hq != hk)
    return out.transpose(1, 2).contiguous(), None


def use_kit_attention(model) -> None:
    """Register the packed attention with transformers and switch `model` (a causal LM, peft or not) to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, kit_varlen_attention)
    lm = causal_lm(model)
    try:
        lm.set_attn_implementation(ATTENTION_NAME)
    except Exception:  # older APIs: the config field is what the layers read
        lm.config._attn_implementation = ATTENTION_NAME


def causal_lm(model):
    """The *ForCausalLM inside a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


# ---------------------------------------------------------------- loss
def _chunked_ce_forward(hidden, weight, targets, chunk):
    """Sum of token CE and d(sum)/d(hidden), one chunk of logits at a time (fp32 softmax, no stored logits)."""
    import torch

    acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax in fp32 (or better)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    grad = torch.empty_like(hidden)
    for s in range(0, hidden.shape[0], chunk):
        h, y = hidden[s:s + chunk], targets[s:s + chunk]
        logits = (h @ weight.t()).to(acc)
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
        probs = torch.exp_(logits.sub_(lse[:, None]))
        probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0
        grad[s:s + chunk] = (probs.to(weight.dtype) @ weight)
    return total, grad


class FusedLinearCrossEntropy:
    """CE(hidden @ weight.T, targets) summed, gradient formed in the forward chunk by chunk (frozen head)."""

    @staticmethod
    def apply(hidden, weight, targets, chunk=4096):
        import torch

        class _F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, h, w, y):
                total, grad = _chunked_ce_forward(h, w, y, chunk)
                ctx.save_for_backward(grad)
                return total

            @staticmethod
            def backward(ctx, g):
                (grad,) = ctx.saved_tensors
                return grad * g.to(grad.dtype), None, None

        return _F.apply(hidden, weight.detach(), targets)


def packed_loss(model, batch: dict, plan: FastPlan | None = None, normalizer: float | None = None):
    """Mean CE over the batch's trained positions (or sum / normalizer), without full-vocabulary logits."""

    lm = causal_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    kwargs = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if k in batch}
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                     **kwargs).last_hidden_state
    targets = batch["targets"].reshape(-1)
    keep = (targets != IGNORE).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    y = targets.index_select(0, keep)
    head = lm.get_output_embeddings()
    chunk = plan.loss_chunk if plan else 4096
    if plan is not None and plan.loss == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        total = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, h, y)
    else:
        total = FusedLinearCrossEntropy.apply(h, head.weight, y, chunk)
    denom = normalizer if normalizer is not None else max(1, int(keep.numel()))
    return total / denom


def batch_from_positions(inputs: dict, pad_to: int | None = None, max_seq: int | None = None) -> dict:
    """A Trainer batch of packed rows (position_ids restart at 0 per sample) -> one flat varlen row.

    `pad_to` pads the row to a fixed number of tokens (blocks of at most `max_seq` that predict nothing) and
    `max_seq` fixes the varlen bound: compiled layers then see the same shapes at every step.
    """
    import torch

    ids, pos, labels = (inputs[k].reshape(-1) for k in ("input_ids", "position_ids", "labels"))
    if pad_to is not None and pad_to > ids.numel():
        extra = pad_to - ids.numel()
        block = max_seq or extra
        ids = torch.cat([ids, ids.new_zeros(extra)])
        pos = torch.cat([pos, torch.arange(extra, device=pos.device, dtype=pos.dtype) % block])
        labels = torch.cat([labels, labels.new_full((extra,), IGNORE)])
    starts = (pos == 0).nonzero().squeeze(1)
    bounds = torch.cat([starts, torch.tensor([ids.numel()], device=ids.device)])
    lengths = bounds[1:] - bounds[:-1]
    targets = torch.cat([labels[1:], labels.new_full((1,), IGNORE)])
    targets[bounds[1:] - 1] = IGNORE  # the last token of each sample predicts nothing
    longest = max(ceil_div(int(lengths.max()), 64) * 64, ceil_div(max_seq or 0, 64) * 64)
    cu = bounds.to(torch.int32)
    return {"input_ids": ids[None], "position_ids": pos[None], "targets": targets[None], "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def packed_trainer_loss(model, inputs: dict, num_items_in_batch=None):
    """The Trainer's loss on the fast path: kit attention (and compiled layers, when the model was prepared with
    `prepare_trainer_model`) for this forward only, fused chunked CE."""
    import torch
    from transformers import AttentionInterface

    lm = causal_lm(model)
    AttentionInterface.register(ATTENTION_NAME, kit_varlen_attention)
    fast = getattr(lm, "_kit_trainer_fast", None) or {}
    layers = list(lm.get_decoder().layers) if fast.get("compiled") else []
    before = lm.config._attn_implementation
    lm.config._attn_implementation = ATTENTION_NAME  # generation in evaluation keeps the model's own attention
    for layer, compiled in zip(layers, fast.get("compiled") or []):
        layer._compiled_call_impl = compiled  # evaluation's generation runs the eager layers
    try:
        batch = batch_from_positions(inputs, fast.get("pad_to"), fast.get("max_seq"))
        if layers:  # the number of samples changes every step: one compiled graph for all of them
            for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
                torch._dynamo.maybe_mark_dynamic(batch[key], 0)
        n = float(num_items_in_batch) if num_items_in_batch is not None else None
        return packed_loss(model, batch, fast.get("plan"), normalizer=n)
    except torch._dynamo.exc.TorchDynamoException as e:  # compilation failed (inductor's errors are wrapped)
        if not layers:
            raise
        print(f"note: compiling the layers failed ({type(e).__name__}); training goes on with eager layers.")
        fast["compiled"], fast["plan"].compile_layers = [], False
        for layer in layers:
            layer._compiled_call_impl = None
        return packed_trainer_loss(model, inputs, num_items_in_batch)
    finally:
        lm.config._attn_implementation = before
        for layer in layers:
            layer._compiled_call_impl = None


# ---------------------------------------------------------------- helpers.train's Trainer on the fast path
def trainer_plan(config, quantization: str, cuda: bool | None = None) -> FastPlan | None:
    """The fast path for helpers.train (notebook 02), or None where it does not apply (no CUDA GPU, no bf16,
    rows not packed): the Trainer then trains exactly as before.

    `quantization` is what helpers.train resolved ("nf4" or "none"). 16-bit: compiled layers, and with
    config.quantization "auto" the plan also picks recomputation for the GPU (none on a big card).
    Both: adapters in bf16, packed varlen rows of the plan's tokens per forward at the same effective batch.
    """
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda or not config.pack_to_max_length or not torch.cuda.is_bf16_supported():
        return None
    plan = make_plan("lean" if quantization == "nf4" else "fast")
    plan.kernels = "torch"
    planned = plan.gradient_checkpointing
    if quantization == "nf4":
        plan.precision, plan.compile_layers = "nf4", False
    if quantization == "nf4" or config.quantization != "auto":  # asked for by name: recomputation as configured
        plan.gradient_checkpointing = bool(config.gradient_checkpointing)
    rows = config.batch_size * config.gradient_accumulation
    # The plan sized its tokens per forward for recomputed layers: without recomputation keep the configured rows.
    tokens = config.batch_size * config.max_length if planned and not plan.gradient_checkpointing \
        else plan.tokens_per_step
    per_forward, accumulation = trainer_batches(tokens, config.max_length, config.batch_size, rows)
    plan.tokens_per_step, plan.accumulation = per_forward * config.max_length, accumulation
    plan.extras = {"batch_size": per_forward, "gradient_accumulation": accumulation}
    plan.reason = (f"{plan.precision} LoRA (bf16 adapters), {'recomputed' if plan.gradient_checkpointing else 'stored'}"
                   f" activations{', compiled layers' if plan.compile_layers else ''}, {per_forward} packed rows of "
                   f"{config.max_length} per forward x {accumulation} (same {rows} rows per update).")
    return plan


def trainer_batches(tokens_per_forward: int, max_length: int, batch_size: int, rows_per_update: int):
    """Rows per forward and forwards per update: as many rows as the plan's tokens allow, dividing the update."""
    per_forward = max(batch_size, min(rows_per_update, tokens_per_forward // max(1, max_length)))
    while rows_per_update % per_forward:
        per_forward -= 1
    return per_forward, rows_per_update // per_forward


def prepare_trainer_model(model, plan: FastPlan, max_length: int):
    """A PeftModel for helpers.train's Trainer: bf16 adapters, compiled layers (switched on only inside
    packed_trainer_loss), fixed packed shapes. Returns the model."""
    import torch

    for name, p in model.named_parameters():
        if "lora_" in name and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
    compiled = []
    if plan.compile_layers:
        for layer in causal_lm(model).get_decoder().layers:
            layer.compile()
            compiled.append(layer._compiled_call_impl)
            layer._compiled_call_impl = None
    causal_lm(model)._kit_trainer_fast = {"plan": plan, "compiled": compiled, "pad_to": plan.tokens_per_step,
                                          "max_seq": max_length}
    return model


def trainer_arguments(plan: FastPlan) -> dict:
    """TrainingArguments the fast path changes: rows per forward and per update (same product), fused AdamW."""
    return {"per_device_train_batch_size": plan.extras["batch_size"],
            "gradient_accumulation_steps": plan.extras["gradient_accumulation"], "optim": "adamw_torch_fused"}


# ---------------------------------------------------------------- model loading
def load_for_training(model_path, plan: FastPlan, lora_r: int = 64, lora_alpha: int = 16, lora_dropout: float = 0.0,
                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """Base model in the plan's precision, LoRA adapters in the same dtype as the compute, packed attention on."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "nf4": torch.bfloat16}.get(plan.precision, torch.float32)
    kwargs = {"dtype": dtype}
    if plan.precision == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if plan.device == "cuda":
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    return add_lora(model, plan, lora_r, lora_alpha, lora_dropout, target_modules)


def add_lora(model, plan: FastPlan, lora_r=64, lora_alpha=16, lora_dropout=0.0,
             target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """LoRA in the compute dtype (no fp32 adapter copies of each activation), packed attention, recomputation."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if plan.kernels == "liger":
        plan.kernels = _apply_liger(model)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                        target_modules=list(target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, config, autocast_adapter_dtype=plan.precision == "fp32")
    if plan.precision in ("bf16", "fp16", "nf4"):  # adapters in the compute dtype: no fp32 copy of each input
        import torch

        dtype = torch.float16 if plan.precision == "fp16" else torch.bfloat16
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
    use_kit_attention(model)
    model.train()
    if plan.compile_layers:
        for layer in causal_lm(model).get_decoder().layers:
            layer.compile()
    return model


def _apply_liger(model) -> str:
    """Liger's fused RMSNorm, SwiGLU and RoPE on this model instance; the loss stays the kit's own."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
        return "liger"
    except Exception as e:  # not supported for this architecture or this GPU: plain torch ops
        return f"torch (liger failed: {type(e).__name__})"


def optimizer_for(model, plan: FastPlan, lr: float = 2e-4):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=plan.device == "cuda")


def packed_steps(examples: list[dict], plan: FastPlan, epochs: int = 1, seed: int = 0, pad_id: int = 0,
                 device=None):
    """Yield optimizer steps: each a list of `plan.accumulation` collated rows of plan.tokens_per_step tokens."""
    for epoch in range(epochs):
        rows = pack_examples(examples, plan.tokens_per_step, seed=seed + epoch)
        for i in range(0, len(rows), plan.accumulation):
            yield [collate_packed(r, pad_to=plan.tokens_per_step, pad_id=pad_id, device=device)
                   for r in rows[i:i + plan.accumulation]]


def train_step(model, optimizer, micro_batches: list[dict], plan: FastPlan, max_grad_norm: float | None = 1.0):
    """One optimizer step over packed rows; the loss is the mean over every trained token of the step."""
    import torch

    n = sum(int((b["targets"] != IGNORE).sum()) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        loss = packed_loss(model, b, plan, normalizer=max(1, n))
        loss.backward()
        total += float(loss.detach())
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# ---------------------------------------------------------------- what this machine offers
def fast_paths() -> dict:
    """Which fast paths this machine has (for notebook 00): attention, loss, precision, optional kernels."""
    import torch

    cuda = torch.cuda.is_available()
    report = {
        "packing": "padding-free, per-sample boundaries",
        "attention": "torch varlen (flash)" if varlen_available() else "SDPA with a block-diagonal mask",
        "loss": "kit fused linear cross-entropy (chunked, no full logits)",
        "liger_kernel": _has("liger_kernel") and cuda,
        "unsloth": _has("unsloth") and cuda,
        "bitsandbytes_4bit": _has("bitsandbytes") and cuda,
    }
    plan = make_plan()
    report["plan"] = f"{plan.precision}, {plan.tokens_per_step} tokens x {plan.accumulation}: {plan.reason}"
    return report


def flops_per_token(config, context: float) -> float:
    """Training FLOPs per token as the benchmark counts them: 2 * (2N + attention), N = matmul weights."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    inter, vocab = config.intermediate_size, config.vocab_size
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter
    n = layers * per_layer + h * vocab
    attention = layers * 2 * 2 * heads * d * context  # QK^T and AV, forward, per token
    return 2 * (2 * n + attention)


def mean_causal_context(lengths) -> float:
    """Average number of keys a query sees when each sample attends causally to itself."""
    tokens = sum(lengths)
    return sum(n * (n + 1) / 2 for n in lengths) / max(1, tokens)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["FastPlan", "make_plan", "pack_examples", "collate_packed", "packed_loss", "load_for_training",
           "add_lora", "train_step", "packed_steps", "fast_paths", "use_kit_attention", "flops_per_token",
           "trainer_plan", "prepare_trainer_model", "trainer_arguments"]
