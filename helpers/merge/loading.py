"""Loading what a merge reads: the adapter (checked), the tokenizer, base + adapter in a dtype on a device, the
generation config with the chat's stop tokens; and where (GPU or CPU) a merge or its check fits."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..base_model import check_model_dir
from ..template import stop_token_ids


class AdapterError(ValueError):
    """An adapter directory that is missing, not an adapter, or does not fit the base model."""


class MergeError(ValueError):
    """The merge cannot go ahead (for instance it would overwrite a final_model)."""


def check_adapter_dir(path: str | os.PathLike) -> Path:
    """Check that `path` is a PEFT adapter directory: adapter_config.json and adapter weights."""
    from ..xtuner import xtuner_hint

    path = Path(path).expanduser()
    if hint := xtuner_hint(path):  # XTuner's names or checkpoint: PEFT cannot put it on the kit's model as it is
        raise AdapterError(hint)
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
    from ..train import gpu_share

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
