"""Merging a LoRA adapter into its base model: one full model that loads with AutoModelForCausalLM alone."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .base_model import check_model_dir
from .paths import staged_dir
from .template import stop_token_ids

# Sample prompts whose logits must agree between base+adapter and the merged model.
VERIFY_PROMPTS = ["请你介绍一下你自己", "你是谁", "今天天气怎么样？", "What is the capital of France?"]
# How far merged and unmerged logits may drift apart: rounding of W + B·A in each dtype. A 16-bit final_model
# is judged on its weights instead (each must be W + B·A rounded to that dtype, within MAX_ULPS units in the last
# place): storing a small update in 16 bits rounds part of it away, which moves the logits by an amount that
# depends on the model and the training, not on whether the merge is right.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}
NOISE_MARGIN = 2  # the logits' fallback for 16-bit adapters the weight check cannot read: 2 x that dtype's noise
MAX_ULPS = 1  # W + B·A computed in 16 bits may round once more than computed in float32 and rounded once


class AdapterError(ValueError):
    """An adapter directory that is missing, not an adapter, or does not fit the base model."""


class MergeError(ValueError):
    """The merge cannot go ahead (for instance it would overwrite a final_model)."""


def check_adapter_dir(path: str | os.PathLike) -> Path:
    """Check that `path` is a PEFT adapter directory: adapter_config.json and adapter weights."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory; run notebook 02 (it writes WORK/adapter) "
                           "or give the folder that holds adapter_config.json.")
    if not (path / "adapter_config.json").exists():
        raise AdapterError(f"{path}: has no adapter_config.json, so it is not a PEFT adapter; give the folder "
                           "that PeftModel.save_pretrained wrote (WORK/adapter).")
    if not any(path.glob("adapter_model.*")):
        raise AdapterError(f"{path}: has adapter_config.json but no adapter_model.safetensors; "
                           "the save was interrupted, train again or copy the weights file in.")
    return path


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").exists() and any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_tokenizer(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None):
    """The tokenizer saved with the adapter (training may have set its chat template), else the model's."""
    from transformers import AutoTokenizer

    source = Path(adapter_dir) if adapter_dir and _has_tokenizer(Path(adapter_dir)) else Path(model_dir)
    return AutoTokenizer.from_pretrained(source)


def load_model(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None, dtype="auto",
               device: str | None = None):
    """A model from `model_dir` (16/32-bit, never quantised), with the adapter on top when one is given.

    Bad paths and adapters that do not fit the base raise ModelPathError / AdapterError with one sentence.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = check_model_dir(model_dir, need_tokenizer=adapter_dir is None)
    if adapter_dir is not None:
        adapter_dir = check_adapter_dir(adapter_dir)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if adapter_dir is not None:
        model = attach_adapter(model, model_dir, adapter_dir)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model


def attach_adapter(model, model_dir: Path, adapter_dir: Path):
    """PeftModel.from_pretrained, turning 'does not fit' into one sentence naming both directories."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise AdapterError(
            f"{adapter_dir}: the adapter was trained on a model of other dimensions than {model_dir} "
            f"({first[:160]}); merge it into the base model it was trained from.") from None
    except ValueError as e:  # peft's NoMatchingPeftModuleError is a ValueError
        if "not found in the base model" not in str(e):
            raise
        targets = json.loads((adapter_dir / "adapter_config.json").read_text()).get("target_modules")
        raise AdapterError(
            f"{adapter_dir}/adapter_config.json: target_modules {targets} do not exist in {model_dir}; "
            "the adapter belongs to another model architecture, merge it into the base it was trained from.") from None


def generation_config_with_stops(model_dir: Path, tokenizer):
    """The base model's generation_config, with eos set to the chat template's stop ids."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        config = GenerationConfig()
    stops = stop_token_ids(tokenizer)
    config.eos_token_id = stops
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    return config


def untie_output_layer(model) -> bool:
    """Give an adapted output layer its own weights when it shares them with the input embedding; True if it did.

    Tied embeddings (Qwen2.5-0.5B/1.5B) are one matrix: merging the output-layer adapter into it would change the
    input embedding too. So the merged model is untied: the input embedding stays the base's, the output layer is
    a copy of it with the adapter merged in (config.tie_word_embeddings becomes False).
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model()
    output, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    if not isinstance(output, BaseTunerLayer) or embedding is None:
        return False
    layer = output.get_base_layer()
    if layer.weight.data_ptr() != embedding.weight.data_ptr():
        return False
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def dir_size(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@dataclass
class MergeResult:
    final_model: Path
    base_model: str
    adapter: str
    dtype: str
    max_shard_size: str
    files: list[str] = field(default_factory=list)
    size_bytes: int = 0
    base_size_bytes: int = 0
    adapter_size_bytes: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    merged_on: str = "cpu"  # where W + B·A was formed

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def merge(base_model: str | os.PathLike, adapter: str | os.PathLike, final_model: str | os.PathLike,
          max_shard_size: str | int = "2GB", dtype="auto", overwrite: bool = False) -> MergeResult:
    """Merge `adapter` into `base_model` and save the full model to `final_model`.

    The base is loaded in its 16/32-bit dtype (never 4-bit: merging into quantised weights would
    round W + B·A to the 4-bit grid and lose most of what was learned), on the GPU when it fits there
    (`merge_device`). The model is written to a temporary folder beside `final_model` and renamed into place,
    so a failed merge leaves nothing behind.
    """
    base_model, final_model = check_model_dir(base_model, need_tokenizer=False), Path(final_model)
    adapter = check_adapter_dir(adapter)
    if final_model.exists() and not overwrite:
        raise MergeError(f"{final_model}: already exists; pass overwrite=True to replace it, "
                         "or choose another final_model directory.")
    tokenizer = load_tokenizer(base_model, adapter)
    generation_config = generation_config_with_stops(base_model, tokenizer)
    merged_dtype, device = _on_gpu_else_cpu(merge_device(base_model, adapter), _merge_on, base_model, adapter,
                                            final_model, tokenizer, generation_config, max_shard_size, dtype)
    return MergeResult(
        final_model=final_model, base_model=str(base_model), adapter=str(adapter),
        dtype=merged_dtype, max_shard_size=str(max_shard_size), merged_on=device,
        files=sorted(p.name for p in final_model.iterdir()), size_bytes=dir_size(final_model),
        base_size_bytes=dir_size(base_model), adapter_size_bytes=dir_size(adapter),
        stop_token_ids=list(generation_config.eos_token_id))


def _merge_on(base_model, adapter, final_model, tokenizer, generation_config, max_shard_size, dtype,
              device: str) -> tuple[str, str]:
    """Load, merge and save on `device`; returns the merged dtype and the device."""
    model = load_model(base_model, adapter, dtype=dtype, device=device)
    untie_output_layer(model)
    with _float32_products():
        merged = model.merge_and_unload()
    merged.generation_config = generation_config
    with staged_dir(final_model) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        check_model_dir(tmp)
    merged_dtype = str(merged.dtype).replace("torch.", "")
    del model, merged
    if device == "cuda":  # the GPU's memory back for the check that follows
        import torch

        torch.cuda.empty_cache()
    return merged_dtype, device


@contextlib.contextmanager
def _float32_products():
    """Matrix products in full float32 for a moment (no TF32 on a GPU): B·A must not lose bits before rounding."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _prompt_ids(tokenizer, prompts: list[str]):
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"] for p in prompts]


def _logits(model, batches) -> list:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in batches]


def verify_merge(final_model: str | os.PathLike, base_model: str | os.PathLike, adapter: str | os.PathLike,
                 prompts: list[str] | None = None, tolerance: float | None = None) -> dict:
    """Does final_model compute base + adapter? Logits on sample prompts against base + adapter (unmerged,
    float32), and for a 16-bit final_model its weights against W + B·A rounded to its dtype.

    float32: passes when the logits agree within `tolerance` (TOLERANCE by default). 16-bit: passes when every
    weight is within MAX_ULPS of W + B·A rounded to that dtype (and the logits within `tolerance` if one is
    given); the logits' distance is then reported, with the share of the adapter's changes too small to survive
    the rounding. A merge that dropped or mis-scaled the adapter fails either way. Runs on the GPU where it fits
    (`verify_device`), and again on the CPU if the GPU runs out of memory all the same (a card shared by others)."""
    return _on_gpu_else_cpu(verify_device(base_model), _verify_on, final_model, base_model, adapter,
                            list(prompts or VERIFY_PROMPTS), tolerance)


def _on_gpu_else_cpu(device: str, fn, *args):
    """fn(*args, device); if the GPU runs out of memory, its memory freed and fn again on the CPU."""
    import gc

    import torch

    try:
        return fn(*args, device)
    except torch.cuda.OutOfMemoryError:
        if device == "cpu":
            raise
    gc.collect()
    torch.cuda.empty_cache()
    return fn(*args, "cpu")


def _verify_on(final_model, base_model, adapter, prompts: list[str], tolerance, device: str) -> dict:
    import torch

    tokenizer = load_tokenizer(final_model)
    batches = _prompt_ids(tokenizer, prompts)
    merged = load_model(final_model, device=device)
    got = _logits(merged, batches)
    dtype = str(merged.dtype).replace("torch.", "")
    del merged
    sixteen = dtype in ("bfloat16", "float16")
    if device == "cuda":
        torch.cuda.empty_cache()
    reference = load_model(base_model, adapter, dtype=torch.float32, device=device)
    exact = _logits(reference, batches)
    with reference.disable_adapter():  # the base alone, from the same loaded weights
        plain = _logits(reference, batches)
    del reference
    diffs = [float((a - b).abs().max()) for a, b in zip(exact, got)]
    max_diff = max(diffs)
    # The adapter's own effect, for scale: a merge that silently dropped the adapter would differ by this much.
    effect = _max_diff(exact, plain)
    weights = check_merged_weights(final_model, base_model, adapter, device) if sixteen else None
    noise = 0.0
    if sixteen and weights is None and tolerance is None:  # an adapter kind the weight check cannot read
        noise = _max_diff(_logits(load_model(base_model, adapter, dtype=getattr(torch, dtype), device=device),
                                  batches), exact)
        tolerance = max(TOLERANCE[dtype], NOISE_MARGIN * noise)
    scale = tolerance if tolerance is not None else TOLERANCE.get(dtype, 1e-2)  # what counts as a change in logits
    if not sixteen:
        tolerance = scale
    passed = (weights is None or weights["max_ulps"] <= MAX_ULPS) and (tolerance is None or max_diff <= tolerance)
    return {"prompts": prompts, "device": device, "max_abs_diff": max_diff, "per_prompt_max_abs_diff": diffs,
            "tolerance": tolerance, "dtype": dtype, "weights": weights, "rounding_noise": noise,
            "logit_scale": scale, "adapter_effect_max_abs": effect, "passed": bool(passed)}


def _stored(model_dir) -> tuple[int, str]:
    """Bytes of a model folder's safetensors and the dtype they hold."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")), dtype


def _gpu_or_cpu(need: float) -> str:
    """"cuda" when `need` bytes fit this process's share of the GPU's free memory, else "cpu"."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    from .train import gpu_share

    free, total = torch.cuda.mem_get_info()
    return "cuda" if min(free, (gpu_share() or 1.0) * total) >= need else "cpu"


def verify_device(base_model) -> str:
    """Where the check's forward passes run: the GPU when the base model in float32 fits in this process's share
    of its free memory (seconds instead of minutes at 1.8 B parameters), else the CPU."""
    stored, dtype = _stored(base_model)
    return _gpu_or_cpu(stored * (2 if dtype in ("bfloat16", "float16") else 1) * 1.25 + 2 * 2**30)


def merge_device(base_model, adapter) -> str:
    """Where the merge runs: the GPU when the base in its own dtype and the adapter fit, else the CPU. Either way
    W + B·A is formed in float32 and rounded once (float32 products: TF32 is switched off for the merge)."""
    stored, _ = _stored(base_model)
    adapter_bytes = sum(f.stat().st_size for f in Path(adapter).glob("adapter_model*"))
    return _gpu_or_cpu(stored * 1.25 + 2 * adapter_bytes + 2**30)


def _tensors(folder: Path, stack) -> dict:
    """name -> an open safetensors file holding it, for every tensor of a folder (one file or sharded); each file
    is opened once, for as long as `stack` (a contextlib.ExitStack) lives."""
    from safetensors import safe_open

    where = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        handle = stack.enter_context(safe_open(str(f), framework="pt"))
        where.update(dict.fromkeys(handle.keys(), handle))
    return where


def check_merged_weights(final_model, base_model, adapter, device: str = "cpu") -> dict | None:
    """Every weight of a 16-bit final_model against W + scale·B·A, computed in float32 from the base's and the
    adapter's own files and rounded once to the final dtype: the largest distance in units in the last place
    (ulps), where it is, and the share of the adapter's nonzero changes that rounding left out. None for adapters
    this reading does not cover (DoRA, per-module ranks, embedding adapters, transposed layers)."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    if (config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("rank_pattern")
            or config.get("alpha_pattern") or config.get("fan_in_fan_out")):
        return None
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / (r ** 0.5 if config.get("use_rslora") else r)
    adapted = _load_all(Path(adapter))
    prefix = "base_model.model."
    lora, full = {}, {}
    for k, v in adapted.items():
        name = k[len(prefix):] if k.startswith(prefix) else k
        if ".lora_A." in name or ".lora_B." in name:
            module, part = name.rsplit(".lora_", 1)
            lora.setdefault(module + ".weight", {})[part[0]] = v
        elif "lora_embedding" in name:
            return None
        else:
            full[name.replace(".modules_to_save.default", "").replace(".modules_to_save", "")] = v
    with contextlib.ExitStack() as stack, _float32_products():
        base, final = _tensors(Path(base_model), stack), _tensors(Path(final_model), stack)
        return _compare_weights(base, final, lora, full, scale, device)


def _compare_weights(base: dict, final: dict, lora: dict, full: dict, scale: float, device: str = "cpu") -> dict:
    import torch

    worst, worst_at, changes, lost = 0.0, "", 0, 0
    for key in sorted(final):
        got = final[key].get_tensor(key).to(device)
        if not got.is_floating_point():
            continue
        if key in full:
            expected = full[key].to(device).float()
        else:
            source = key if key in base else ("model.embed_tokens.weight" if key == "lm_head.weight" else None)
            if source is None or source not in base:
                return {"max_ulps": float("inf"), "worst": f"{key} (not in the base model)", "changes": 0,
                        "rounded_away": 0.0}
            expected = base[source].get_tensor(source).to(device).float()
            if key in lora:
                delta = (lora[key]["B"].to(device).float() @ lora[key]["A"].to(device).float()) * scale
                rounded_base = expected.to(got.dtype)
                changed = delta != 0
                changes += int(changed.sum())
                lost += int((changed & (got == rounded_base)).sum())
                expected = expected + delta
        target = expected.to(got.dtype).float()
        _, exponent = torch.frexp(target)
        mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}.get(got.dtype, 23)
        ulp = torch.ldexp(torch.ones_like(target), (exponent - 1 - mantissa_bits).clamp(min=-133))
        ulps = float(((got.float() - target).abs() / ulp).max()) if got.numel() else 0.0
        if ulps > worst:
            worst, worst_at = ulps, key
    return {"max_ulps": worst, "worst": worst_at, "changes": changes,
            "rounded_away": lost / changes if changes else 0.0}


def _load_all(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("adapter_model*.safetensors")) for k, v in load_file(str(f)).items()}


def _max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))
