"""Merging a LoRA adapter into its base model (notebook 03): one full model that loads with AutoModelForCausalLM
alone, checked before it is put in place.

- loading.py   the adapter (checked), tokenizer, base + adapter on a device; where a merge or its check fits
- merging.py   merge(): W + B·A in float32 rounded once, staged, verified, swapped in
- checks.py    verify_merge(): structure, config, chat template, 16-bit weights and logits against base + adapter
- record.py    the verification record in final_model, and require_verified() that every reader calls
"""
from __future__ import annotations

from .checks import (CONFIG_MAY_DIFFER, MAX_ULPS, NOISE_MARGIN, TOLERANCE, VERIFY_PROMPTS, check_merged_weights,
                     first_names, verification_rows, verify_merge)
from .loading import (AdapterError, MergeError, _has_tokenizer, check_adapter_dir, dir_size,
                      generation_config_with_stops, load_model, load_tokenizer, merge_device, untie_output_layer,
                      verify_device)
from .merging import MergeResult, merge
from .record import (VERIFICATION_FILE, UnverifiedModelError, needs_verification, require_verified,
                     verification_problem, write_verification)

__all__ = ["CONFIG_MAY_DIFFER", "MAX_ULPS", "NOISE_MARGIN", "TOLERANCE", "VERIFY_PROMPTS", "check_merged_weights",
           "first_names", "verification_rows", "verify_merge", "AdapterError", "MergeError", "_has_tokenizer",
           "check_adapter_dir", "dir_size", "generation_config_with_stops", "load_model", "load_tokenizer",
           "merge_device", "untie_output_layer", "verify_device", "MergeResult", "merge", "VERIFICATION_FILE",
           "UnverifiedModelError", "needs_verification", "require_verified", "verification_problem",
           "write_verification"]
