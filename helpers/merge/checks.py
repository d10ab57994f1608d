"""The merge check: does final_model compute base + adapter? Its structure, config, chat template, 16-bit
weights and logits, each compared with what base + adapter requires."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..template import stop_token_ids
from .loading import (_float32_products, _on_gpu_else_cpu, generation_config_with_stops, load_model, load_tokenizer,
                      untie_output_layer, verify_device)

# Sample prompts whose logits must agree between base+adapter and the merged model.
VERIFY_PROMPTS = ["请你介绍一下你自己", "你是谁", "今天天气怎么样？", "What is the capital of France?"]
# How far merged and unmerged logits may drift apart: rounding of W + B·A in each dtype. A 16-bit final_model
# is judged on its weights instead (each must be W + B·A rounded to that dtype, within MAX_ULPS units in the last
# place): storing a small update in 16 bits rounds part of it away, which moves the logits by an amount that
# depends on the model and the training, not on whether the merge is right.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}
NOISE_MARGIN = 2  # a 16-bit final_model's logits may differ from the in-memory merge by 2 x that dtype's rounding noise
MAX_ULPS = 1  # W + B·A computed in 16 bits may round once more than computed in float32 and rounded once


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
    """Does final_model compute base + adapter? The whole model is judged, not only the tensors it holds:

    - its tensors and their shapes are exactly those of base + adapter (none missing, none extra);
    - every field of config.json and generation_config.json that changes what the model computes or where it
      stops equals the base's (CONFIG_MAY_DIFFER lists the exceptions, each with its reason);
    - its tokenizer renders the chat template to the same ids as the tokenizer the adapter was trained with;
    - a 16-bit final_model: every weight is W + B·A rounded to its dtype, within MAX_ULPS;
    - the logits on VERIFY_PROMPTS: float32 within `tolerance` (TOLERANCE) of base + adapter; 16-bit within
      `tolerance`, by default NOISE_MARGIN x the rounding noise of that dtype (how far base + adapter merged in
      memory and rounded to the dtype moves from the float32 logits), of that in-memory merge.
    `problems` holds one sentence per finding and `problem` the first; `passed` is True only without any.
    Runs on the GPU where it fits (`verify_device`), and again on the CPU if the GPU runs out of memory all the
    same (a card shared by others)."""
    final_model, base_model, adapter = Path(final_model), Path(base_model), Path(adapter)
    trained = load_tokenizer(base_model, adapter)  # the tokenizer the adapter was trained with
    problems = _structure_problems(final_model, base_model, adapter)
    problems += _config_problems(final_model, base_model, adapter, trained) + _template_problems(final_model, trained)
    try:
        found = _on_gpu_else_cpu(verify_device(base_model), _verify_on, final_model, base_model, adapter, trained,
                                 list(prompts or VERIFY_PROMPTS), tolerance)
    except Exception as e:  # a model that does not even load is a finding, not a crash
        if not problems:
            raise
        found = {"prompts": list(prompts or VERIFY_PROMPTS), "passed": False, "max_abs_diff": float("inf"),
                 "tolerance": tolerance, "weights": None, "logit_problem": f"it does not load ({type(e).__name__})"}
    problems += [found.pop("logit_problem")] if found.get("logit_problem") else []
    return found | {"problems": problems, "problem": problems[0] if problems else "", "passed": not problems}


def verification_rows(check: dict) -> dict:
    """What verify_merge found, one line per part of the check (for notebook 03's table)."""
    weights, dtype = check.get("weights"), check.get("dtype")
    rows = {"tensors and shapes": "those of base + adapter",
            "config.json, generation_config.json": "the base's (stops at the chat template's end of turn)",
            "chat template": "the same token ids as in training",
            "weights": (f"every one W + B·A rounded to {dtype}, within {weights['max_ulps']:.0f} ulp; "
                        f"{weights['rounded_away']:.1%} of the adapter's changes below {dtype}'s resolution")
                       if weights else f"{dtype}: judged by the logits",
            "logits": f"max |diff| {check['max_abs_diff']:.2e} <= bound {check['tolerance']:.2g}",
            "the adapter's own effect on the logits": f"{check['adapter_effect_max_abs']:.3f}"}
    return rows if check.get("passed") else {"verdict": check.get("problem", "failed")}


# Fields of config.json / generation_config.json that may differ between a base and its merged model, and why.
CONFIG_MAY_DIFFER = {
    "transformers_version": "the library version that wrote the file",
    "_name_or_path": "where the model was loaded from",
    "dtype": "the weights' dtype, judged on the weights themselves (dtype='float32' may be asked for)",
    "torch_dtype": "the older name of dtype",
    "eos_token_id": "generation_config: the merge stops at the chat template's end-of-turn (checked below)",
    "pad_token_id": "generation_config: set from the tokenizer when the base has none (checked below)",
}
# tie_word_embeddings may go from true to false: the merge unties an output layer that carries an adapter
# (untie_output_layer), so the input embedding stays the base's.


def _shapes(folder: Path) -> dict[str, tuple]:
    """name -> shape of every tensor in a folder's safetensors files, from their headers."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
    return shapes


def _adapts_output_layer(adapter: Path) -> bool:
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    return "lm_head" in targets or "lm_head" in (config.get("modules_to_save") or [])


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def first_names(keys: list[str], n: int = 3) -> str:
    """The first n names and how many more, for a one-sentence finding."""
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _structure_problems(final: Path, base: Path, adapter: Path) -> list[str]:
    """The tensors final_model must hold: the base's, plus an output layer of its own when the merge untied it."""
    base_shapes, final_shapes = _shapes(base), _shapes(final)
    if not base_shapes:  # a base in PyTorch .bin files: the weights' check below compares what it can
        return []
    expected = dict(base_shapes)
    tied = _read_json(final / "config.json").get("tie_word_embeddings")
    embedding = next((k for k in base_shapes if k.endswith("embed_tokens.weight")), None)
    if tied is False and "lm_head.weight" not in expected and embedding:
        expected["lm_head.weight"] = base_shapes[embedding]
    if tied:  # a tied output layer is the embedding: it may be stored or left out
        expected.pop("lm_head.weight", None)
        final_shapes.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(final_shapes))
    extra = sorted(set(final_shapes) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(final_shapes) if expected[k] != final_shapes[k])
    problems = []
    if missing:
        problems.append(f"final_model lacks {len(missing)} tensor(s) that base + adapter has ({first_names(missing)})")
    if extra:
        problems.append(f"final_model holds {len(extra)} tensor(s) that base + adapter does not ({first_names(extra)})")
    for k in reshaped[:3]:
        problems.append(f"{k} has shape {list(final_shapes[k])} in final_model but {list(expected[k])} in base + adapter")
    return problems


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_problems(final: Path, base: Path, adapter: Path, trained) -> list[str]:
    """Every config field that changes what the model computes, or where its answers stop, must be the base's."""
    from transformers import AutoConfig, GenerationConfig

    problems = []
    if not (final / "config.json").exists():
        return ["final_model has no config.json"]
    got, want = (_flat(AutoConfig.from_pretrained(p).to_dict()) for p in (final, base))
    for key in sorted(set(got) | set(want)):
        leaf = key.rsplit(".", 1)[-1]
        a, b = got.get(key, "(missing)"), want.get(key, "(missing)")
        if a == b or leaf in CONFIG_MAY_DIFFER:
            continue
        if leaf == "tie_word_embeddings" and b is True and a is False and _adapts_output_layer(adapter):
            continue
        problems.append(f"config.json's {key} is {a!r} in final_model but {b!r} in the base")
    expected = generation_config_with_stops(base, trained).to_dict()
    try:
        stored = GenerationConfig.from_pretrained(final).to_dict()
    except OSError:
        return problems + ["final_model has no generation_config.json, so its answers would not stop at the end "
                           "of a turn"]
    for key in sorted(set(stored) | set(expected)):
        if key == "transformers_version" or stored.get(key) == expected.get(key):
            continue
        problems.append(f"generation_config.json's {key} is {stored.get(key, '(missing)')!r} in final_model but "
                        f"{expected.get(key, '(missing)')!r} for base + adapter")
    return problems


def _template_problems(final: Path, theirs) -> list[str]:
    """final_model's tokenizer must turn a chat into the same ids as the one the adapter was trained with."""
    try:
        mine = load_tokenizer(final)
    except Exception as e:  # any tokenizer-loading failure is the finding
        return [f"final_model's tokenizer does not load ({type(e).__name__})"]
    if mine.chat_template != theirs.chat_template:
        return ["final_model's chat template differs from the one the adapter was trained with"]
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": VERIFY_PROMPTS[0]},
            {"role": "assistant", "content": VERIFY_PROMPTS[1]}, {"role": "user", "content": VERIFY_PROMPTS[3]}]
    ids = [t.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"] for t in (mine, theirs)]
    if ids[0] != ids[1] or stop_token_ids(mine) != stop_token_ids(theirs):
        return ["final_model's tokenizer gives other token ids (or stop tokens) for the same chat than the "
                "tokenizer the adapter was trained with"]
    return []


def _verify_on(final_model, base_model, adapter, tokenizer, prompts: list[str], tolerance, device: str) -> dict:
    import torch

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
    # The adapter's own effect, for scale: a merge that silently dropped the adapter would differ by this much.
    effect = _max_diff(exact, plain)
    noise, compared = 0.0, exact
    if sixteen:  # what a right merge computes in that dtype: base + adapter merged in float32, rounded once
        untie_output_layer(reference)
        with _float32_products():
            rounded = reference.merge_and_unload().to(getattr(torch, dtype))
        compared = _logits(rounded, batches)
        noise = _max_diff(compared, exact)
        del rounded
    del reference
    if device == "cuda":
        torch.cuda.empty_cache()
    diffs = [float((a - b).abs().max()) for a, b in zip(compared, got)]
    max_diff = max(diffs)
    if tolerance is None:
        tolerance = max(NOISE_MARGIN * noise, TOLERANCE["float32"]) if sixteen else TOLERANCE.get(dtype, 1e-2)
    weights = check_merged_weights(final_model, base_model, adapter, device) if sixteen else None
    problem = ""
    if weights and weights["max_ulps"] > MAX_ULPS:
        problem = (f"its weights are not base + adapter rounded to {dtype}: {weights['worst']} is "
                   f"{weights['max_ulps']:.3g} units in the last place off")
    elif max_diff > tolerance:
        problem = (f"its logits differ from base + adapter's by up to {max_diff:.3g}, above the bound {tolerance:.3g} "
                   f"(the adapter itself moves them by {effect:.3g})")
    return {"prompts": prompts, "device": device, "max_abs_diff": max_diff, "per_prompt_max_abs_diff": diffs,
            "tolerance": tolerance, "dtype": dtype, "weights": weights, "rounding_noise": noise,
            "logit_scale": TOLERANCE.get(dtype, 1e-2), "adapter_effect_max_abs": effect,
            "passed": not problem, "logit_problem": problem}


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
