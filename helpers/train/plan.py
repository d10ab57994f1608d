"""How a run trains on this machine, decided once: `make_plan(config, model_config, hardware, updates, stage)`.

The plan is frozen: weights (bf16 / NF4 / fp32), layers (eager / compiled / Liger's fused kernels), attention,
loss, rows per forward and accumulation, recomputation, adapter dtype, strategy (single / DDP / ZeRO-2 / FSDP),
each with the reason for it. The code that trains (helpers.train.model, .trainer, helpers.vlm_train) reads it and
nothing else; notebook 02 shows it as a table; notebook 00's recommendation is the same function without a model.
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

GIB = 2**30
COMPILE_MIN_UPDATES = 400  # H200, 1.8B, 16k tokens: compiling costs ~22 s and saves ~0.06 s an update
# internlm2-chat-1.8b's dimensions: the plan for notebook 00, before a model is chosen
COURSE_MODEL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                    num_key_value_heads=8, vocab_size=92544, tie_word_embeddings=False, model_type="llama")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------- the machine
@dataclass(frozen=True)
class Hardware:
    """What the plan needs to know of this machine."""

    cuda: bool = False
    memory_gib: float = 0.0            # GPU memory this process may use (a class run's share included)
    bf16: bool = False
    bitsandbytes: bool = False
    varlen: bool = False               # torch's flash varlen attention
    liger: str | None = "not installed"  # None: Liger's kernels run and agree here; else why not

    @staticmethod
    def detect() -> "Hardware":
        import torch

        if not torch.cuda.is_available():
            return Hardware()
        from .packed import varlen_available

        return Hardware(cuda=True, memory_gib=gpu_memory_gib(), bf16=torch.cuda.is_bf16_supported(),
                        bitsandbytes=_has("bitsandbytes"), varlen=varlen_available(),
                        liger=fused_kernels_fail("cuda") if _has("liger_kernel") else "liger-kernel is not installed")


def gpu_memory_gib(device: int = 0) -> float:
    """The GPU memory this process may use: the card's, times the per-process fraction when one is set."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return total * (fraction(device) if fraction else 1.0) / GIB


def fused_kernels_fail(device) -> str | None:
    """Why Liger's kernels cannot be used on `device` (Triton cannot build or launch them, or its RMSNorm disagrees
    with the formula), or None when its RMSNorm runs there and matches. Probed on the GPU the run trains on."""
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


# ---------------------------------------------------------------- memory
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
    return {
        "weights": (0.52 if precision == "nf4" else 4.0 if precision == "fp32" else 2.0) * linear + 2.0 * embeddings,
        "adapters": 18.0 * lora,  # fp32 weight, gradient, two AdamW moments, the bf16 copy autocast caches
        # Eager layers keep ~20% more than compiled ones (H200, 1.8B, 16 rows of 1024: bf16 eager 61.6 GiB, NF4
        # 59.5, bf16 compiled 52.7): sized for eager layers, the larger.
        "stored_per_token": layers * per_layer_token * 1.2,
        "recomputed_per_token": layers * h * 2 + per_layer_token,
        "loss_chunk": vocab_chunk * vocab * 10.0,  # fp32 logits and probabilities, their 16-bit copy
    }


def rows_that_fit(memory_gib: float, fixed_bytes: float, row_bytes: float) -> int:
    """Rows whose activations fit beside `fixed_bytes` with the peak at ~85% of the memory (0.5 GiB spare for
    the CUDA context and allocator slack): the one headroom rule of every plan (the LLM's and the VLM stages')."""
    return int(max(0.0, 0.85 * memory_gib * GIB - fixed_bytes - 0.5 * GIB) // row_bytes)


def split_update(rows_fit: int, batch_size: int, rows_per_update: int) -> tuple[int, int]:
    """Rows per forward and forwards per update: as many rows as fit, dividing the update."""
    per_forward = max(batch_size, min(rows_per_update, rows_fit))
    while rows_per_update % per_forward:
        per_forward -= 1
    return per_forward, rows_per_update // per_forward


def size_llm(model_config, precisions: list[str], memory_gib: float, max_length: int, batch_size: int,
             rows_per_update: int, lora_r: int, recompute_modes: list[bool]) -> dict:
    """Weights, recomputation, rows per forward and loss chunk that fit `memory_gib` (peak <= ~85%).

    First choice: a forward of at least min(4, rows per update) rows; stored activations before recomputed ones,
    16-bit before 4-bit weights. Then anything that fits one row; then the leanest choice, marked as not fitting.
    """
    chunk = 4096 if memory_gib >= 40 else 1024
    for want in (min(4, rows_per_update), batch_size):
        for recompute in recompute_modes:
            for precision in precisions:
                need = footprint(model_config, precision, lora_r, chunk)
                fixed = need["weights"] + need["adapters"] + need["loss_chunk"]
                per_token = need["recomputed_per_token" if recompute else "stored_per_token"]
                rows_fit = rows_that_fit(memory_gib, fixed, per_token * max_length)
                if rows_fit < max(want, batch_size):
                    continue
                rows, accumulation = split_update(rows_fit, batch_size, rows_per_update)
                return {"weights": precision, "recomputation": recompute, "rows": rows, "accumulation": accumulation,
                        "loss_chunk": chunk, "fits": True,
                        "estimate_gib": round((fixed + rows * max_length * per_token) / GIB, 1)}
    precision = precisions[-1]
    need = footprint(model_config, precision, lora_r, 1024)
    return {"weights": precision, "recomputation": recompute_modes[-1], "rows": batch_size,
            "accumulation": max(1, rows_per_update // batch_size), "loss_chunk": 1024, "fits": False,
            "estimate_gib": round((need["weights"] + need["adapters"] + need["loss_chunk"]
                                   + batch_size * max_length * need["recomputed_per_token"]) / GIB, 1)}


def vlm_row_bytes(model_config, tokens: int, recompute: bool) -> float:
    """Bytes one LLaVA row holds beyond the weights: the LLM's activations per token, the full logits the model's
    own loss keeps (16 bytes a vocabulary entry), and the picture's pass through the vision tower. It leans high:
    for benchmarks/gpu_vlm_real_dims.py's H200 run it gives 2.6 GiB where 2.9 GiB (with the weights' states) was
    measured above the loaded model."""
    text = getattr(model_config, "text_config", model_config)
    need = footprint(text, "bf16", 0, 0)
    per_token = need["recomputed_per_token" if recompute else "stored_per_token"] + 16.0 * text.vocab_size
    v = getattr(model_config, "vision_config", None)
    per_picture = 0.0
    if v is not None and all(hasattr(v, a) for a in ("image_size", "patch_size", "hidden_size", "intermediate_size")):
        patches = (v.image_size // v.patch_size) ** 2 + 1
        layer = (14 * v.hidden_size + 4 * v.intermediate_size) * 2 * patches
        per_picture = (v.num_hidden_layers * v.hidden_size * 2 * patches + layer) if recompute \
            else v.num_hidden_layers * layer
    return per_token * tokens + per_picture


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class TrainingPlan:
    """How one run trains; `why` holds (choice, reason) pairs in the order of `table()`."""

    device: str = "cpu"
    weights: str = "fp32"            # "bf16" / "fp16" (LoRA on 16-bit weights), "nf4" (4-bit QLoRA), "fp32" (CPU)
    adapters: str = "fp32"
    layers: str = "eager"            # "eager", "compiled" (torch.compile per decoder layer), "liger" (fused kernels)
    attention: str = "block mask"    # "varlen" (flash), "block mask" (SDPA), "model" (the model's own, VLM)
    loss: str = "chunked"            # "chunked" (fused linear CE), "model" (the model's own, VLM)
    loss_chunk: int = 4096
    rows_per_forward: int = 1
    accumulation: int = 1
    pad_to: int | None = None        # tokens per forward, fixed for compiled layers
    max_seq: int | None = None       # the varlen bound, fixed with pad_to
    recomputation: bool = False
    strategy: str = "single"         # "single", "ddp", "zero2", "fsdp"
    ranks: int = 1
    optimizer: str = "adamw_torch"
    autocast: bool = False           # bf16 autocast around fp32 adapters
    estimate_gib: float | None = None
    memory_gib: float | None = None
    why: tuple = ()

    def as_dict(self) -> dict:
        return asdict(self) | {"why": dict(self.why)}

    def summary(self) -> str:
        return "; ".join(f"{k} {v}" for k, v in self.rows())

    def rows(self) -> list[tuple[str, str]]:
        return [("weights", self.weights), ("adapters", self.adapters), ("layers", self.layers),
                ("attention", self.attention), ("loss", self.loss if self.loss == "model"
                                                 else f"{self.loss}, {self.loss_chunk} rows a chunk"),
                ("rows per forward", f"{self.rows_per_forward} x {self.accumulation} forwards per update"),
                ("recomputation", "on" if self.recomputation else "off"),
                ("strategy", self.strategy if self.ranks == 1 else f"{self.strategy} on {self.ranks} processes")]

    def table(self):
        """choice | this run | why (notebook 02 shows it)."""
        import pandas as pd

        why = dict(self.why)
        return pd.DataFrame([{"choice": k, "this run": v, "why": why.get(k, "")} for k, v in self.rows()]
                            ).set_index("choice")


def liger_fits(model_config) -> bool:
    return getattr(model_config, "model_type", "llama") == "llama" and \
        getattr(model_config, "hidden_act", "silu") in ("silu", "swish")


def make_plan(config, model_config=None, hardware: Hardware | None = None, updates: int | None = None,
              stage: int | None = None, longest: int | None = None, ranks: int = 1) -> "TrainingPlan":
    """The plan for a resolved TrainConfig (this rank's share of the update when `ranks` > 1): the LLM's
    (`stage` None) or a VLM stage's (1: projector only, 2: LoRA + projector; `longest` = its longest row)."""
    from .config import TrainConfigError

    hw = hardware or Hardware.detect()
    mc = model_config
    if mc is None:
        from transformers import LlamaConfig

        mc = LlamaConfig(**COURSE_MODEL)
    text = getattr(mc, "text_config", mc)
    why: dict[str, str] = {}
    rows_per_update = config.batch_size * config.gradient_accumulation
    strategy = "single" if ranks == 1 else config.distributed
    why["strategy"] = "one process" if ranks == 1 else f"num_gpus={ranks}, distributed={config.distributed!r}"
    if config.quantization == "nf4" and not (hw.cuda and hw.bitsandbytes):
        need = "a CUDA GPU and none is visible" if not hw.cuda else "the bitsandbytes package, which is not installed"
        raise TrainConfigError(f"quantization='nf4' needs {need}; use quantization='none' (16/32-bit LoRA) or "
                               "'auto' on this machine.")
    if not hw.cuda:
        why["weights"] = "no CUDA GPU: 32-bit weights (exact, not fast)"
        why["attention"] = "no CUDA GPU: SDPA with a block-diagonal mask per packed row"
        why["adapters"] = "as the weights"
        why["layers"] = "no CUDA GPU: torch's own layers"
        why["loss"] = "the model's own (a VLM stage)" if stage else "chunked cross-entropy on the trained positions"
        why["rows per forward"] = "as configured (batch_size x gradient_accumulation)"
        why["recomputation"] = "as configured (gradient_checkpointing)"
        return TrainingPlan(
            weights="fp32", attention="model" if stage else "block mask", loss="model" if stage else "chunked",
            rows_per_forward=config.batch_size, accumulation=config.gradient_accumulation,
            recomputation=bool(config.gradient_checkpointing) and stage != 1, strategy=strategy, ranks=ranks,
            why=tuple(why.items()))
    sixteen = "bf16" if hw.bf16 else "fp16"
    if config.quantization == "nf4":
        precisions = ["nf4"]
        why["weights"] = "quantization='nf4': 4-bit NF4 with double quantisation (QLoRA)"
    elif config.quantization == "none" or stage == 1 or not hw.bitsandbytes:
        precisions = [sixteen]
        why["weights"] = ("stage 1 trains the projector only: 16-bit weights" if stage == 1 else
                          "quantization='none'" if config.quantization == "none" else
                          "bitsandbytes is not installed: 16-bit weights")
    else:
        precisions = [sixteen, "nf4"]  # auto: 16-bit weights where they fit with room to work, else 4-bit
    modes = [False, True] if config.quantization != "none" or stage else [bool(config.gradient_checkpointing)]
    if stage:  # a VLM stage: rows padded to the longest record, the model's own loss and attention
        modes = [bool(config.gradient_checkpointing) and stage == 2]
        sized = _size_vlm(mc, precisions, hw.memory_gib, longest or config.max_length, config, stage, modes[0])
    else:
        sized = size_llm(text, precisions, hw.memory_gib, config.max_length, config.batch_size, rows_per_update,
                         config.lora_r, modes)
    weights = sized["weights"]
    if len(precisions) > 1:
        why["weights"] = (f"{hw.memory_gib:.0f} GiB: 16-bit weights fit with room for the activations" if
                          weights != "nf4" else f"{hw.memory_gib:.0f} GiB: 16-bit weights leave too little room; "
                                                "4-bit NF4 with double quantisation (QLoRA)")
    fits = "" if sized["fits"] else " (the estimate does not fit: lower max_length or lora_r if it runs out)"
    why["rows per forward"] = (f"as many of the update's {rows_per_update} rows as fit {hw.memory_gib:.0f} GiB "
                               f"(estimated peak {sized['estimate_gib']} GiB){fits}")
    why["recomputation"] = ("forced by gradient_checkpointing" if len(modes) == 1 and not stage else
                            "the stage's gradient_checkpointing" if stage else
                            "stored activations do not fit enough rows" if sized["recomputation"] else
                            "stored activations fit: no second forward")
    layers, why["layers"] = _layers(hw, text, weights, strategy, updates, stage)
    attention = "model" if stage else "varlen" if hw.varlen else "block mask"
    why["attention"] = ("the model's own (rows padded to the longest record)" if stage else
                        "torch's flash varlen kernel: each sample attends only to itself" if hw.varlen else
                        "SDPA with a block-diagonal mask (this GPU or torch has no varlen kernel)")
    why["adapters"] = "fp32 under bf16 autocast: the schedule's last small updates survive"
    why["loss"] = ("the model's own (full logits; rows are short)" if stage else
                   "chunked cross-entropy on the trained positions only: no full-vocabulary logits")
    autocast = hw.bf16 and not stage
    return TrainingPlan(
        device="cuda", weights=weights, adapters="fp32" if autocast or weights == "nf4" else weights,
        layers=layers, attention=attention, loss="model" if stage else "chunked", loss_chunk=sized["loss_chunk"],
        rows_per_forward=sized["rows"], accumulation=sized["accumulation"],
        pad_to=None if stage else sized["rows"] * config.max_length, max_seq=None if stage else config.max_length,
        recomputation=sized["recomputation"], strategy=strategy, ranks=ranks,
        optimizer="adamw_torch_fused", autocast=autocast, estimate_gib=sized["estimate_gib"],
        memory_gib=round(hw.memory_gib, 1), why=tuple(why.items()))


def _layers(hw: Hardware, text_config, weights: str, strategy: str, updates: int | None, stage) -> tuple[str, str]:
    if not stage and weights != "nf4" and strategy != "fsdp" and updates is not None and updates >= COMPILE_MIN_UPDATES:
        return "compiled", f"{updates} updates win back the ~20 s of compiling each decoder layer"
    if hw.liger is None and liger_fits(text_config):
        because = ("4-bit layers run eager" if weights == "nf4" else "FSDP gathers each layer in its own forward"
                   if strategy == "fsdp" else "a VLM stage" if stage else
                   f"{updates} updates do not win back the ~20 s compilation" if updates is not None else "eager")
        return "liger", f"{because}; Liger's fused RMSNorm, SwiGLU and RoPE kernels"
    note = hw.liger if liger_fits(text_config) else "the model is not Llama-shaped"
    return "eager", f"eager layers; no fused kernels ({note})"


def _size_vlm(model_config, precisions, memory_gib, longest, config, stage, recompute) -> dict:
    """A VLM stage's weights and rows per forward, from the LLM's footprint plus the vision tower."""
    text = getattr(model_config, "text_config", model_config)
    v = getattr(model_config, "vision_config", None)
    vision = 0.0 if v is None else v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size
                                                          * v.intermediate_size) * 2.0
    rows_per_update = config.batch_size * config.gradient_accumulation
    row = vlm_row_bytes(model_config, longest, recompute)
    for precision in precisions:
        need = footprint(text, precision, config.lora_r if stage == 2 else 0, 0)
        fixed = need["weights"] + vision + need["adapters"] * (1.3 if stage == 2 else 0) \
            + 18.0 * text.hidden_size * (text.hidden_size + (v.hidden_size if v is not None else 0))
        rows_fit = rows_that_fit(memory_gib, fixed, row)
        if rows_fit >= config.batch_size or precision == precisions[-1]:
            rows, accumulation = split_update(max(rows_fit, 1), config.batch_size, rows_per_update)
            return {"weights": precision, "recomputation": recompute, "rows": rows, "accumulation": accumulation,
                    "loss_chunk": 0, "fits": rows_fit >= config.batch_size,
                    "estimate_gib": round((fixed + rows * row) / GIB, 1)}


# ---------------------------------------------------------------- throughput
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
