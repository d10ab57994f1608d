"""The packed model: a PEFT causal LM whose own forward, given a flat row of samples, returns the training loss.

Two things the ecosystem does not do for us, each measured in benchmarks/:
- padding-free packing: samples lie end to end in one row, each keeps its own positions (RoPE restarts at 0) and
  attends only to itself (torch's varlen flash attention on a GPU, SDPA with a block-diagonal mask elsewhere);
- no full-vocabulary logits: the loss is computed chunk by chunk on the trained positions only, and the gradient
  of each chunk is formed right away (a fused linear cross-entropy).
Because the loss is the model's own forward, DDP, ZeRO-2 and FSDP wrap this model like any other: their hooks see
every pass. Called without `targets` (generation, a plain forward), it is the PEFT model it extends.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

from peft import PeftModelForCausalLM

ATTENTION_NAME = "kit_varlen"
IGNORE = -100
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# ---------------------------------------------------------------- attention
def varlen_available() -> bool:
    """torch's own flash-attention varlen kernel (no extra package) on a CUDA GPU of compute capability >= 8."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability(0)[0] < 8:
        return False
    try:
        _varlen_call()
    except Exception:  # noqa: BLE001 - an older torch: the masked SDPA is exact, only slower
        return False
    return True


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


_VARLEN: dict = {}  # torch's varlen kernel and its keywords, found once by use_kit_attention (not per layer call)


def kit_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over one packed row (each sample attends only to itself, causally); any other call (generation,
    a padded batch) is SDPA with the mask transformers built, as the model's own "sdpa" attention computes it."""
    import torch
    import torch.nn.functional as F

    cu = kwargs.get("cu_seq_lens_q")
    b, hq, t, d = query.shape
    hk = key.shape[1]
    if cu is None or b != 1:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             is_causal=attention_mask is None and t > 1, enable_gqa=hq != hk)
        return out.transpose(1, 2).contiguous(), None
    if query.is_cuda and _VARLEN.get("fn") is not None:
        if query.dtype not in (torch.bfloat16, torch.float16):  # an fp32 residual stream: flash needs 16-bit
            out, _ = kit_varlen_attention(module, query.to(torch.bfloat16), key.to(torch.bfloat16),
                                          value.to(torch.bfloat16), attention_mask, scaling, dropout, **kwargs)
            return out.to(query.dtype), None
        fn, causal, gqa = _VARLEN["fn"], _VARLEN["causal"], _VARLEN["gqa"]
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
    """Register the packed attention (with SDPA's mask for calls that are not packed) and switch `model` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if "fn" not in _VARLEN:
        fn, causal, gqa = _varlen_call() if varlen_available() else (None, {}, False)
        _VARLEN.update(fn=fn, causal=causal, gqa=gqa)
    AttentionInterface.register(ATTENTION_NAME, kit_varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)


# ---------------------------------------------------------------- the flat row
def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def flat_batch(rows: dict, pad_to: int | None = None, max_seq: int | None = None) -> dict:
    """Rows of samples (position_ids restart at 0 at each sample) -> one flat row: input_ids, position_ids, the
    shifted targets, the varlen boundaries and `keep` (the positions that are trained).

    `pad_to` pads the row to a fixed number of tokens (blocks of at most `max_seq` that predict nothing) and
    `max_seq` fixes the varlen bound: compiled layers then see the same shapes at every step.
    """
    import torch

    ids, pos, labels = (rows[k].reshape(-1) for k in ("input_ids", "position_ids", "labels"))
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


# ---------------------------------------------------------------- the loss
def _chunked_ce_forward(hidden, weight, targets, chunk):
    """Sum of token CE and d(sum)/d(hidden), one chunk of logits at a time (fp32 softmax, no stored logits)."""
    import torch

    acc = torch.promote_types(hidden.dtype, torch.float32)
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


def fused_cross_entropy(hidden, weight, targets, chunk: int = 4096):
    """CE(hidden @ weight.T, targets) summed for a frozen output layer; the gradient is formed in the forward."""
    import torch

    class _FusedCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w, y):
            total, grad = _chunked_ce_forward(h, w, y, chunk)
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            return grad * g.to(grad.dtype), None, None

    return _FusedCE.apply(hidden, weight.detach(), targets)


def _head_chunk_ce(head, h, y):
    import torch.nn.functional as F

    return F.cross_entropy(head(h).float(), y, reduction="sum")


def head_cross_entropy(hidden, head, targets, chunk: int = 4096):
    """CE(head(hidden), targets) summed, chunk by chunk, for an output layer that trains (a LoRA on it): each
    chunk's logits are recomputed in the backward instead of kept, and gradients reach the head's adapter."""
    from torch.utils.checkpoint import checkpoint

    total = hidden.sum() * 0.0  # no trained position: a zero that still belongs to the graph
    for s in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_head_chunk_ce, head, hidden[s:s + chunk], targets[s:s + chunk],
                                   use_reentrant=False)
    return total


def whole(weight):
    """A frozen weight as one tensor on this rank (FSDP keeps each rank's shard, a DTensor, outside a forward)."""
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def packed_loss(lm, batch: dict, loss: str = "chunked", chunk: int = 4096, normalizer=None):
    """Mean CE over a flat row's trained positions (or sum / normalizer) for a causal LM, without full logits."""
    decoder = lm.get_decoder()
    kwargs = {k: batch[k] for k in PACKED_KEYS if k in batch}
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                     **kwargs).last_hidden_state
    targets = batch["targets"].reshape(-1)
    keep = batch["keep"] if batch.get("keep") is not None else (targets != IGNORE).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    y = targets.index_select(0, keep)
    head = lm.get_output_embeddings()
    if any(p.requires_grad for p in head.parameters()):  # an adapter on the output layer: its gradient must flow
        total = head_cross_entropy(h, head, y, chunk)
    elif loss == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        total = LigerFusedLinearCrossEntropyLoss(reduction="sum")(whole(head.weight), h, y)
    else:
        total = fused_cross_entropy(h, whole(head.weight), y, chunk)
    return total / (normalizer if normalizer is not None else max(1, int(keep.numel())))


# ---------------------------------------------------------------- the model
class ExactLoss:
    """The loss's float32 value in a box that wrappers do not recast (FSDP2's bf16 policy casts the tensors a root
    module returns to bf16, three digits); the Trainer's compute_loss puts it back under the loss's gradient."""

    def __init__(self, value):
        self.value = value


@functools.cache
def _packed_output():
    from dataclasses import dataclass

    from transformers.utils import ModelOutput

    @dataclass
    class PackedLMOutput(ModelOutput):
        loss: object = None
        exact: object = None

    return PackedLMOutput


class PackedCausalLM(PeftModelForCausalLM):
    """A LoRA causal LM whose forward(targets=..., cu_seq_lens_q=..., ...) returns the packed training loss.

    Built by helpers.train.model from a TrainingPlan: the plan's loss and chunk, and whether adapters (fp32) run
    under bf16 autocast. Any other call is PeftModelForCausalLM's own forward (generation, a plain loss)."""

    def __init__(self, model, peft_config, plan):
        super().__init__(model, peft_config)
        self.plan = plan
        self.compile_failed = ""  # why compiled layers could not run here: the run goes on with eager ones

    def forward(self, *args, targets=None, labels=None, num_items_in_batch=None, keep=None, **kwargs):
        if targets is None:
            return super().forward(*args, labels=labels, **kwargs)
        import torch

        batch = dict(kwargs, targets=targets, keep=keep)
        n = num_items_in_batch  # the Trainer's count of trained tokens, a tensor on the GPU: no float() (a sync)
        if torch.is_tensor(n):
            n = n.to(targets.device, torch.float32)
        if self.plan.layers == "compiled" and not self.compile_failed:
            for key in ("cu_seq_lens_q", "cu_seq_lens_k"):  # the samples per row vary: one graph for all counts
                torch._dynamo.maybe_mark_dynamic(batch[key], 0)
        with contextlib.ExitStack() as stack:
            if self.plan.autocast and targets.is_cuda:
                stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
            if self.compile_failed:
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            try:
                loss = packed_loss(self.get_base_model(), batch, self.plan.loss, self.plan.loss_chunk, normalizer=n)
            except torch._dynamo.exc.TorchDynamoException as e:  # inductor's errors come wrapped in this
                if self.plan.layers != "compiled" or self.compile_failed:
                    raise
                cause = getattr(e, "inner_exception", None) or e.__cause__ or e  # what inductor itself hit
                self.compile_failed = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:160]}"
                print(f"note: compiling the layers failed ({self.compile_failed}); training goes on with eager layers.")
                return self.forward(*args, targets=targets, labels=labels, num_items_in_batch=num_items_in_batch,
                                    keep=keep, **kwargs)
        return _packed_output()(loss=loss, exact=ExactLoss(loss.detach().float()))


@contextlib.contextmanager
def adapter_input_casting(model, on: bool):
    """peft's LoRA layers cast their input to the adapter's dtype; under autocast (fp32 adapters, 16-bit layers)
    the cast is switched off for training and back on for answering. Restores what it found."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = on
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m.cast_input_dtype_enabled = was


@contextlib.contextmanager
def training_mode(model, plan):
    """For the whole of a training run: 16-bit inputs reach the fp32 adapters as they are (bf16 autocast). The
    switch spans the run, not each forward: recomputed layers run again in the backward and must match."""
    with adapter_input_casting(model, not plan.autocast):
        yield


@contextlib.contextmanager
def generation_mode(model, plan=None):
    """Answering questions in the middle of training: eager layers (compiled ones are built for the packed
    shapes) and the adapters' input cast back on."""
    import torch

    with contextlib.ExitStack() as stack:
        if plan is not None and plan.layers == "compiled":
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        stack.enter_context(adapter_input_casting(model, True))
        yield
