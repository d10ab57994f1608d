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
NOISE_MARGIN = 2  # a 16-bit final_model's logits may differ from the in-memory merge by 2 x that dtype's rounding noise
MAX_ULPS = 1  # W + B·A computed in 16 bits may round once more than computed in float32 and rounded once


class AdapterError(ValueError):
    """An adapter directory that is missing, not an adapter, or does not fit the base model."""


class MergeError(ValueError):
    """The merge cannot go ahead (for instance it would overwrite a final_model)."""


def check_adapter_dir(path: str | os.PathLike) -> Path:
    """Check that `path` is a PEFT adapter directory: adapter_config.json and adapter weights."""
    from .xtuner import xtuner_hint

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
        from .chat_defaults import trained_system_prompt, write_chat_defaults

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


# ---------------------------------------------------------------- the verification record
VERIFICATION_FILE = "verification.json"  # written into final_model by merge(): what was checked, and the files' hashes


class UnverifiedModelError(ValueError):
    """A final_model without a passed verification record, or whose files changed since it was verified."""


def write_verification(model_dir: Path, check: dict, base_model: Path, adapter: Path) -> dict:
    """Record in `model_dir` that it was verified against base + adapter, with the hashes of what was verified."""
    from .data import atomic_write_text
    from .fingerprint import folder_hashes, folder_sha256

    record = {"passed": bool(check["passed"]), "problem": check.get("problem", ""),
              "base_model": str(base_model), "base_model_sha256": folder_sha256(base_model),
              "adapter": str(adapter), "adapter_sha256": folder_sha256(adapter),
              "dtype": check.get("dtype"), "device": check.get("device"),
              "max_abs_diff": check.get("max_abs_diff"), "bound": check.get("tolerance"),
              "rounding_noise": check.get("rounding_noise"), "max_ulps": (check.get("weights") or {}).get("max_ulps"),
              "files": folder_hashes(model_dir)}
    atomic_write_text(Path(model_dir) / VERIFICATION_FILE, json.dumps(record, indent=1, default=str) + "\n")
    return record


def needs_verification(model_dir: str | os.PathLike) -> bool:
    """A merged chat model: a folder with a verification record, or a work dir's final_model (not the VLM's)."""
    model_dir = Path(model_dir)
    if (model_dir / VERIFICATION_FILE).exists():
        return True
    if model_dir.name != "final_model" or model_dir.parent.name == "vlm":
        return False
    return "vision_config" not in _read_json(model_dir / "config.json")


def verification_problem(model_dir: str | os.PathLike) -> str:
    """'' when `model_dir` carries a passed verification record that matches its files; else one sentence."""
    from .fingerprint import folder_hashes

    model_dir = Path(model_dir)
    record_file = model_dir / VERIFICATION_FILE
    if not record_file.exists():
        return (f"{model_dir} has no verification record ({VERIFICATION_FILE}): it was not made by notebook 03's "
                "merge, or that merge was not checked; run notebook 03 again")
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        recorded = dict(record["files"])
    except (ValueError, KeyError, TypeError):
        return f"{record_file} cannot be read; run notebook 03 again"
    if not record.get("passed"):
        return f"{model_dir} failed its merge check ({record.get('problem') or 'see notebook 03'}); run notebook 03 again"
    now = folder_hashes(model_dir)
    changed = sorted(n for n in set(now) | set(recorded) if now.get(n) != recorded.get(n))
    if changed:
        return f"{model_dir}: {first_names(changed)} changed since the merge was verified; run notebook 03 again"
    return ""


def require_verified(model_dir: str | os.PathLike, allow_unverified: bool = False) -> str:
    """Refuse a merged model whose verification is missing, failed or out of date (UnverifiedModelError, one
    sentence). allow_unverified (a teacher's experiment): returns the warning to show with every output instead.
    Returns '' for a verified model and for folders that are not merged models (a base model)."""
    if not needs_verification(model_dir):
        return ""
    problem = verification_problem(model_dir)
    if problem and not allow_unverified:
        raise UnverifiedModelError(problem + " (or pass --unverified / allow_unverified=True for an experiment).")
    return f"UNVERIFIED MODEL: {problem}" if problem else ""
