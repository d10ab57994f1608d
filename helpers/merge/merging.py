"""The merge itself: W + B·A formed in float32 and rounded once, written to a staging folder, verified there, and
only then swapped in as final_model with its verification record."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..base_model import check_model_dir
from ..paths import staged_dir
from .checks import verify_merge
from .loading import (MergeError, _float32_products, _on_gpu_else_cpu, check_adapter_dir, dir_size, generation_config_with_stops,
                      load_model, load_tokenizer, merge_device, untie_output_layer)
from .record import write_verification


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
    verification: dict = field(default_factory=dict)  # verify_merge's findings on the staged model

    def as_dict(self) -> dict:
        """The merge's facts and its verification's, in one flat dict (notebook 03's results)."""
        facts = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items() if k != "verification"}
        return facts | self.verification


def merge(base_model: str | os.PathLike, adapter: str | os.PathLike, final_model: str | os.PathLike,
          max_shard_size: str | int = "2GB", dtype="auto", overwrite: bool = False,
          tolerance: float | None = None) -> MergeResult:
    """Merge `adapter` into `base_model`, verify the result, and only then put it in place as `final_model`.

    The base is loaded in its 16/32-bit dtype (never 4-bit: merging into quantised weights would
    round W + B·A to the 4-bit grid and lose most of what was learned), on the GPU when it fits there
    (`merge_device`). The model is written to a staging folder beside `final_model`, checked there by
    `verify_merge`, and swapped in with its verification record (VERIFICATION_FILE); a merge that fails its check
    raises MergeError and leaves the previous `final_model` as it was.
    """
    base_model, final_model = check_model_dir(base_model, need_tokenizer=False), Path(final_model)
    adapter = check_adapter_dir(adapter)
    if final_model.exists() and not overwrite:
        raise MergeError(f"{final_model}: already exists; pass overwrite=True to replace it, "
                         "or choose another final_model directory.")
    tokenizer = load_tokenizer(base_model, adapter)
    generation_config = generation_config_with_stops(base_model, tokenizer)
    with staged_dir(final_model) as staging:
        merged_dtype, device = _on_gpu_else_cpu(merge_device(base_model, adapter), _merge_on, base_model, adapter,
                                                staging, tokenizer, generation_config, max_shard_size, dtype)
        check = verify_merge(staging, base_model, adapter, tolerance=tolerance)
        if not check["passed"]:
            kept = (f"the previous {final_model.name} is kept as it was" if final_model.exists()
                    else f"nothing was written to {final_model}")
            raise MergeError(f"the merged model does not compute base + adapter: {check['problem']}; {kept}.")
        from ..chat_defaults import trained_system_prompt, write_chat_defaults

        write_chat_defaults(staging, trained_system_prompt(base_model, adapter) or "")  # the prompt it was trained with
        write_verification(staging, check, base_model, adapter)
        files = sorted(p.name for p in staging.iterdir())
        size = dir_size(staging)
    return MergeResult(
        final_model=final_model, base_model=str(base_model), adapter=str(adapter),
        dtype=merged_dtype, max_shard_size=str(max_shard_size), merged_on=device,
        files=files, size_bytes=size, base_size_bytes=dir_size(base_model), adapter_size_bytes=dir_size(adapter),
        stop_token_ids=list(generation_config.eos_token_id), verification=check)


def _merge_on(base_model, adapter, out_dir: Path, tokenizer, generation_config, max_shard_size, dtype,
              device: str) -> tuple[str, str]:
    """Load, merge and save into `out_dir` on `device`; returns the merged dtype and the device."""
    model = load_model(base_model, adapter, dtype=dtype, device=device)
    untie_output_layer(model)
    with _float32_products():
        merged = model.merge_and_unload()
    merged.generation_config = generation_config
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    check_model_dir(out_dir)
    merged_dtype = str(merged.dtype).replace("torch.", "")
    del model, merged
    if device == "cuda":  # the GPU's memory back for the check that follows
        import torch

        torch.cuda.empty_cache()
    return merged_dtype, device
