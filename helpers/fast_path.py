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
        gpu_memory_gib = _process_memory_gib() if cuda else 0.0
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
    if query.is_cuda and _VARLEN["ok"]:
        if query.dtype not in (torch.bfloat16, torch.float16):  # an fp32 residual stream: flash needs 16-bit
            out, _ = kit_varlen_attention(module, query.to(torch.bfloat16), key.to(torch.bfloat16),
                                          value.to(torch.bfloat16), attention_mask, scaling, dropout, **kwargs)
            return out.to(query.dtype), None
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
    """The *ForCausalLM inside a PeftModel (or the model itself), through DDP / compile wrappers."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=True)
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


def _head_chunk_ce(head, h, y):
    import torch.nn.functional as F

    return F.cross_entropy(head(h).float(), y, reduction="sum")


def head_cross_entropy(hidden, head, targets, chunk=4096):
    """CE(head(hidden), targets) summed, chunk by chunk, for an output layer that trains (a LoRA on it): each
    chunk's logits are recomputed in the backward instead of kept, and gradients reach the head's adapter."""
    from torch.utils.checkpoint import checkpoint

    total = hidden.sum() * 0.0  # no trained position: a zero that still belongs to the graph
    for s in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_head_chunk_ce, head, hidden[s:s + chunk], targets[s:s + chunk],
                                   use_reentrant=False)
    return total


def whole(weight):
    """A frozen weight as one tensor on this rank: FSDP keeps each rank's shard (a DTensor) outside the module's
    own forward, and the fused loss reads the output layer's weight without calling the layer."""
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def _head_trains(head) -> bool:
    return any(p.requires_grad for p in head.parameters())


def packed_loss(model, batch: dict, plan: FastPlan | None = None, normalizer: float | None = None):
    """Mean CE over the batch's trained positions (or sum / normalizer), without full-vocabulary logits."""

    lm = causal_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    kwargs = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if k in batch}
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                     **kwargs).last_hidden_state
    targets = batch["targets"].reshape(-1)
    keep = batch["keep"] if "keep" in batch else (targets != IGNORE).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    y = targets.index_select(0, keep)
    head = lm.get_output_embeddings()
    chunk = plan.loss_chunk if plan else 4096
    if _head_trains(head):  # an adapter on the output layer: its gradient must flow (the fused loss has none)
        total = head_cross_entropy(h, head, y, chunk)
    elif plan is not None and plan.loss == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        total = LigerFusedLinearCrossEntropyLoss(reduction="sum")(whole(head.weight), h, y)
    else:
        total = FusedLinearCrossEntropy.apply(h, whole(head.weight), y, chunk)
    denom = normalizer if normalizer is not None else max(1, int(keep.numel()))
    return total / denom


def batch_from_positions(inputs: dict, pad_to: int | None = None, max_seq: int | None = None) -> dict:
    """A Trainer batch of packed rows (position_ids restart at 0 per sample) -> one flat varlen row.

    `pad_to` pads the row to a fixed number of tokens (blocks of at most `max_seq` that predict nothing) and
    `max_seq` fixes the varlen bound: compiled layers then see the same shapes at every step. The collator calls
    it on the CPU, so the GPU never waits for these small index computations (each would be a sync).
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
            "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
            "keep": (targets != IGNORE).nonzero().squeeze(1)}


def set_training_mode(model, on: bool) -> None:
    """Switch a model prepared by `prepare_trainer_model` between training (kit varlen attention, compiled
    layers, adapters fed 16-bit inputs under autocast) and generation (the model's own attention, eager layers).

    The switch stays on from the first packed loss until `set_training_mode(model, False)`: recomputed layers
    (gradient checkpointing) run again in the backward and must see the forward's attention and layers.
    """
    lm = causal_lm(model)
    fast = getattr(lm, "_kit_trainer_fast", None)
    if not fast or fast.get("training", False) == on:
        return
    from transformers import AttentionInterface

    if on:
        AttentionInterface.register(ATTENTION_NAME, kit_varlen_attention)
        fast["attention_before"] = lm.config._attn_implementation
        lm.config._attn_implementation = ATTENTION_NAME
    else:
        lm.config._attn_implementation = fast.get("attention_before", lm.config._attn_implementation)
    for layer, compiled in zip(lm.get_decoder().layers, fast.get("compiled") or []):
        layer._compiled_call_impl = compiled if on else None
    for module in lm.modules():  # under autocast the fp32 adapters take 16-bit inputs as they are
        if hasattr(module, "cast_input_dtype_enabled") and fast.get("autocast"):
            module.cast_input_dtype_enabled = not on
    fast["training"] = on


class generation_mode:
    """`with generation_mode(model):` answers questions with the model's own attention and eager layers, and
    returns to training after (a no-op for a model that is not in training mode)."""

    def __init__(self, model):
        self.model, self.was = model, bool((getattr(causal_lm(model), "_kit_trainer_fast", None) or {}).get("training"))

    def __enter__(self):
        set_training_mode(self.model, False)

    def __exit__(self, *exc):
        if self.was:
            set_training_mode(self.model, True)


def packed_trainer_loss(model, inputs: dict, num_items_in_batch=None):
    """The Trainer's loss on the fast path: kit attention (and compiled layers, when the model was prepared with
    `prepare_trainer_model`), fused chunked CE, bf16 autocast on a GPU."""
    import contextlib

    import torch

    lm = causal_lm(model)
    fast = getattr(lm, "_kit_trainer_fast", None) or {}
    set_training_mode(model, True)
    compiled = bool(fast.get("compiled"))
    batch = inputs.get("varlen") or batch_from_positions(inputs, fast.get("pad_to"), fast.get("max_seq"))
    if compiled:  # the number of samples changes every step: one compiled graph for all of them
        for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
            torch._dynamo.maybe_mark_dynamic(batch[key], 0)
    n = num_items_in_batch  # the Trainer's count of trained tokens, a tensor on the GPU: no float() (a sync)
    if torch.is_tensor(n):
        n = n.to(batch["targets"].device, torch.float32)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if fast.get("autocast") and inputs["input_ids"].is_cuda \
        else contextlib.nullcontext()
    try:
        with autocast:
            return packed_loss(model, batch, fast.get("plan"), normalizer=n)
    except torch._dynamo.exc.TorchDynamoException as e:  # compilation failed (inductor's errors are wrapped)
        if not compiled:
            raise
        print(f"note: compiling the layers failed ({type(e).__name__}); training goes on with eager layers.")
        set_training_mode(model, False)
        fast["compiled"], fast["plan"].compile_layers = [], False
        return packed_trainer_loss(model, inputs, num_items_in_batch)


# ---------------------------------------------------------------- helpers.train's Trainer on the fast path
GIB = 2**30


def gpu_memory_gib(device: int = 0) -> float:
    """The GPU memory this process may use: the card's, times the per-process fraction when one is set
    (`torch.cuda.set_per_process_memory_fraction`, e.g. to act as a smaller card)."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return total * (fraction(device) if fraction else 1.0) / GIB


_process_memory_gib = gpu_memory_gib


def footprint(model_config, precision: str, lora_r: int, vocab_chunk: int) -> dict:
    """Bytes the training needs on the GPU, by part, for a Llama-like decoder (weights, adapters with their
    gradients and AdamW states, activations per token stored or recomputed, one chunk of the loss)."""
    c = model_config
    h, f, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    d = getattr(c, "head_dim", None) or h // heads
    vocab = c.vocab_size
    linear = layers * (h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * f)
    embeddings = vocab * h * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    lora = layers * lora_r * ((h + heads * d) * 2 + 2 * (h + kv * d) + 3 * (h + f))
    per_layer_token = (14 * h + 4 * f) * 2  # bf16 tensors a decoder layer keeps for its backward, per token
    nf4 = precision == "nf4"
    return {
        "weights": (0.52 if nf4 else 2.0) * linear + 2.0 * embeddings,
        "adapters": 18.0 * lora,  # fp32 weight, gradient, two AdamW moments, the bf16 copy autocast caches
        # Eager layers keep ~20% more than compiled ones (H200, 1.8B, 16 rows of 1024: bf16 eager 61.6 GiB, NF4
        # 59.5, bf16 compiled 52.7); 4-bit layers always run eager and 16-bit ones do in runs too short to compile,
        # which is decided after this plan, so the plan sizes for eager layers.
        "stored_per_token": layers * per_layer_token * 1.2,
        "recomputed_per_token": layers * h * 2 + per_layer_token,
        "loss_chunk": vocab_chunk * vocab * 10.0,  # fp32 logits and probabilities, their 16-bit copy
    }


def rows_that_fit(memory_gib: float, fixed_bytes: float, row_bytes: float) -> int:
    """Rows whose activations fit beside `fixed_bytes` with the peak at ~85% of the memory (0.5 GiB spare for
    the CUDA context and allocator slack): the one headroom rule of every plan (the LLM's and the VLM stages')."""
    return int(max(0.0, 0.85 * memory_gib * GIB - fixed_bytes - 0.5 * GIB) // row_bytes)


def size_plan(model_config, quantization: str, memory_gib: float, max_length: int, batch_size: int,
              rows_per_update: int, lora_r: int, checkpointing: bool | None = None) -> dict:
    """Precision, recomputation, rows per forward and loss chunk that fit `memory_gib` (peak <= ~85%).

    quantization "auto" tries bf16 weights first, then NF4; "nf4" and "none" keep their precision.
    Stored activations win when at least min(4, rows per update) rows fit in one forward (no second forward);
    else the layers are recomputed and the forward takes as many rows as fit. checkpointing True/False forces it.
    """
    chunk = 4096 if memory_gib >= 40 else 1024
    precisions = {"auto": ["bf16", "nf4"], "nf4": ["nf4"], "none": ["bf16"]}[quantization]
    modes = [False, True] if checkpointing is None else [checkpointing]
    # First choice: a forward of at least min(4, rows per update) rows; stored activations before recomputed
    # ones, 16-bit before 4-bit weights. Then anything that fits one row.
    for want in (min(4, rows_per_update), batch_size):
        for recompute in modes:
            for precision in precisions:
                need = footprint(model_config, precision, lora_r, chunk)
                fixed = need["weights"] + need["adapters"] + need["loss_chunk"]
                per_token = need["recomputed_per_token" if recompute else "stored_per_token"]
                rows_fit = rows_that_fit(memory_gib, fixed, per_token * max_length)
                if rows_fit < max(want, batch_size):
                    continue
                rows, accumulation = trainer_batches(rows_fit * max_length, max_length, batch_size, rows_per_update)
                return {"precision": precision, "gradient_checkpointing": recompute, "rows": rows,
                        "accumulation": accumulation, "loss_chunk": chunk, "fits": True,
                        "estimate_gib": round((fixed + rows * max_length * per_token) / GIB, 1)}
    precision = precisions[-1]  # nothing fits: the leanest choice, said so in the plan's reason
    need = footprint(model_config, precision, lora_r, 1024)
    return {"precision": precision, "gradient_checkpointing": modes[-1], "rows": batch_size,
            "accumulation": max(1, rows_per_update // batch_size), "loss_chunk": 1024, "fits": False,
            "estimate_gib": round((need["weights"] + need["adapters"] + need["loss_chunk"]
                                   + batch_size * max_length * need["recomputed_per_token"]) / GIB, 1)}


def trainer_plan(config, quantization: str, model_config=None, memory_gib: float | None = None,
                 cuda: bool | None = None, bf16: bool | None = None) -> FastPlan | None:
    """The fast path for helpers.train (notebook 02), or None where it does not apply (no CUDA GPU, no bf16,
    rows not packed): the Trainer then trains exactly as before.

    `quantization` is the config's ("auto", "nf4" or "none"). For "auto" and "nf4" the plan sizes precision
    (auto only), recomputation, rows per forward and the loss chunk to the GPU memory this process may use
    (`size_plan`); for "none" recomputation is as configured. Adapters and their AdamW states stay fp32 (bf16
    autocast for the products); 16-bit weights get compiled layers.
    """
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    bf16 = (cuda and torch.cuda.is_bf16_supported()) if bf16 is None else bf16
    if not cuda or not config.pack_to_max_length or not bf16:
        return None
    memory_gib = gpu_memory_gib() if memory_gib is None else memory_gib
    rows = config.batch_size * config.gradient_accumulation
    forced = None if quantization in ("auto", "nf4") else bool(config.gradient_checkpointing)
    sized = size_plan(model_config, quantization, memory_gib, config.max_length, config.batch_size, rows,
                      config.lora_r, forced)
    precision = sized["precision"]
    plan = FastPlan(device="cuda", precision=precision, gradient_checkpointing=sized["gradient_checkpointing"],
                    tokens_per_step=sized["rows"] * config.max_length, accumulation=sized["accumulation"],
                    attention="varlen" if varlen_available() else "sdpa", loss_chunk=sized["loss_chunk"],
                    compile_layers=precision != "nf4")
    plan.extras = {"batch_size": sized["rows"], "gradient_accumulation": sized["accumulation"],
                   "memory_gib": round(memory_gib, 1), "estimate_gib": sized["estimate_gib"]}
    fits = "" if sized["fits"] else " (the estimate does not fit: lower max_length or lora_r if it runs out)"
    plan.reason = (f"{memory_gib:.0f} GiB for this process: {precision} weights, fp32 adapters, "
                   f"{'recomputed' if plan.gradient_checkpointing else 'stored'} activations"
                   f"{', compiled layers' if plan.compile_layers else ''}, {sized['rows']} packed rows of "
                   f"{config.max_length} per forward x {sized['accumulation']} (same {rows} rows per update), "
                   f"loss chunk {sized['loss_chunk']}, estimated peak {sized['estimate_gib']} GiB{fits}.")
    return plan


def trainer_batches(tokens_per_forward: int, max_length: int, batch_size: int, rows_per_update: int):
    """Rows per forward and forwards per update: as many rows as the plan's tokens allow, dividing the update."""
    per_forward = max(batch_size, min(rows_per_update, tokens_per_forward // max(1, max_length)))
    while rows_per_update % per_forward:
        per_forward -= 1
    return per_forward, rows_per_update // per_forward


def prepare_trainer_model(model, plan: FastPlan, max_length: int):
    """A PeftModel for helpers.train's Trainer: fp32 adapters (bf16 autocast on a GPU), compiled layers and the
    kit attention (switched on by `set_training_mode`), fixed packed shapes. Returns the model."""
    import torch

    for name, p in model.named_parameters():  # the schedule's last small updates survive only in fp32
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    compiled = []
    if plan.compile_layers:
        for layer in causal_lm(model).get_decoder().layers:
            layer.compile()
            compiled.append(layer._compiled_call_impl)
            layer._compiled_call_impl = None
    causal_lm(model)._kit_trainer_fast = {"plan": plan, "compiled": compiled, "pad_to": plan.tokens_per_step,
                                          "max_seq": max_length, "autocast": plan.device == "cuda",
                                          "training": False}
    return model


COMPILE_MIN_UPDATES = 400  # H200, 1.8B, 16k tokens: compiling costs ~22 s and saves ~0.06 s an update


def fit_layers_to_run(model, updates: int) -> None:
    """Compiled layers only for a run long enough to win back the compilation; eager layers otherwise, with
    Liger's fused RMSNorm, SwiGLU and RoPE kernels where liger-kernel is installed (`pip install -e .[gpu]`)."""
    fast = getattr(causal_lm(model), "_kit_trainer_fast", None)
    if not fast:
        return
    plan = fast["plan"]
    if fast.get("compiled") and updates < COMPILE_MIN_UPDATES:
        fast["compiled"], plan.compile_layers = [], False
        plan.reason = plan.reason.replace(", compiled layers", "") + \
            f" Eager layers: {updates} updates do not win back the ~20 s compilation."
    if not fast.get("compiled") and plan.device == "cuda" and use_fused_kernels(model):
        plan.kernels = "liger"
        plan.reason += " Liger's fused RMSNorm, SwiGLU and RoPE kernels in the eager layers."


def use_fused_kernels(model) -> bool:
    """Put Liger's Triton kernels for RMSNorm, SwiGLU and RoPE in a Llama-layout model's layers (each replaces a
    chain of separate elementwise kernels; the kit's own loss stays). False where liger-kernel is missing or the
    model is not Llama-shaped. RoPE is swapped in transformers' Llama module, so for every Llama in this process."""
    lm = causal_lm(model)
    if lm.config.model_type != "llama" or getattr(lm.config, "hidden_act", "silu") not in ("silu", "swish") \
            or not _has("liger_kernel"):
        return False
    failure = fused_kernels_fail(next(lm.parameters()).device)
    if failure:
        print(f"note: Liger's kernels do not work here ({failure}); training goes on with the plain eager layers "
              f"(uninstall liger-kernel to skip this check).")
        return False
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=lm)
    return True


def fused_kernels_fail(device) -> str | None:
    """Why Liger's kernels cannot be used on `device` (Triton cannot build or launch them, e.g. no C compiler; or
    its RMSNorm disagrees with the formula), or None when its RMSNorm runs and matches."""
    import torch

    try:
        from liger_kernel.transformers import LigerRMSNorm

        x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
        got = LigerRMSNorm(64, eps=1e-6).to(device)(x).float()
    except Exception as e:  # noqa: BLE001 - whatever stops the kernel, training must go on without it
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
    want = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2):
        return f"its RMSNorm is {float((got - want).abs().max()):.3g} from the formula"
    return None


def trainer_arguments(plan: FastPlan) -> dict:
    """TrainingArguments the fast path changes: rows per forward and per update (same product), fused AdamW."""
    return {"per_device_train_batch_size": plan.extras["batch_size"],
            "gradient_accumulation_steps": plan.extras["gradient_accumulation"],
            "optim": "adamw_torch_fused" if plan.device == "cuda" else "adamw_torch"}


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


__all__ = ["FastPlan", "make_plan", "pack_examples", "collate_packed", "packed_loss", "fast_paths",
           "use_kit_attention", "flops_per_token", "trainer_plan", "size_plan", "prepare_trainer_model",
           "trainer_arguments", "set_training_mode", "generation_mode"]
