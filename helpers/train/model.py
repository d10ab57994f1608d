"""The model a plan trains: the base (4-bit NF4 or 16/32-bit) with a fresh LoRA adapter, as a PackedCausalLM whose
forward is the packed loss; its layers (eager, compiled, Liger's kernels) and attention set up here, once."""
from __future__ import annotations

from pathlib import Path

from .config import TrainConfig, TrainConfigError
from .plan import TrainingPlan


def target_module_names(model, target_modules, train_lm_head: bool = False) -> list[str]:
    """The LoRA targets as module names: 'all-linear' = every linear layer but the output one; checked."""
    import torch

    linear = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear) or type(mod).__name__.startswith("Linear")}
    inner = sorted(linear - {"lm_head"})
    if target_modules == "all-linear":
        wanted = inner
    else:
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        unknown = [m for m in wanted if m not in linear]
        if unknown:
            raise TrainConfigError(f"target_modules names {unknown}, which this model does not have; use "
                                   f"'all-linear' or some of {inner}.")
    return wanted + (["lm_head"] if train_lm_head and "lm_head" in linear and "lm_head" not in wanted else [])


def dtype_of(weights: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(weights, torch.bfloat16)


def quantization_config(plan: TrainingPlan, skip: list[str] | None = None):
    """bitsandbytes' 4-bit NF4 with double quantisation (the course's QLoRA), computing in 16 bits."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if plan.autocast or torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, **({"llm_int8_skip_modules": skip} if skip else {}))


def load_kwargs(plan: TrainingPlan) -> dict:
    """from_pretrained's arguments for the plan's weights: NF4 straight onto this process's GPU, else a dtype."""
    import torch

    if plan.weights == "nf4":
        config = quantization_config(plan)
        return {"quantization_config": config, "dtype": config.bnb_4bit_compute_dtype,
                "device_map": {"": torch.cuda.current_device()}}
    if plan.device == "cuda":  # straight onto this process's GPU: no copy through the host's memory
        return {"dtype": dtype_of(plan.weights), "device_map": {"": torch.cuda.current_device()}}
    return {"dtype": dtype_of(plan.weights)}


def set_up_layers(lm, plan: TrainingPlan) -> None:
    """The plan's layers: Liger's fused RMSNorm / SwiGLU / RoPE kernels in a Llama's modules, or each decoder
    layer compiled (compiled once, here; answering questions mid-run runs them eagerly, see packed.generation_mode)."""
    if plan.layers == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=lm)
    elif plan.layers == "compiled":
        for layer in lm.get_decoder().layers:
            layer.compile()


def load_model_for_training(config: TrainConfig, plan: TrainingPlan, model_path: str, tokenizer=None):
    """(PackedCausalLM, tokenizer) for `plan`: the base in the plan's weights, recomputation, a fresh LoRA adapter
    (seeded) in fp32, the packed attention and the plan's layers."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from ..base_model import check_model_dir
    from .packed import PackedCausalLM, use_kit_attention

    if Path(model_path).exists():
        check_model_dir(model_path)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, **load_kwargs(plan))
    model.config.use_cache = False
    if plan.recomputation:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    use_kit_attention(model)
    set_up_layers(model, plan)
    targets = target_module_names(model, config.target_modules, config.train_lm_head)
    set_seed(config.seed)  # the adapter's initial weights
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    lora.base_model_name_or_path = model.__dict__.get("name_or_path") or None
    model = PackedCausalLM(model, lora, plan)
    for p in model.parameters():  # fp32 adapters: the schedule's last small updates survive only in fp32
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
