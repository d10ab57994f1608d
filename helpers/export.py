"""Taking the assistant home: `python -m helpers export WORK/final_model --gguf` writes GGUF files (f16 and q8_0)
through the `gguf` package, llama.cpp's own writer — tensor names, metadata, tokenizer, chat template and stop token
as llama.cpp's convert script writes them for a Llama model — and an Ollama Modelfile beside them."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

QUANTS = ("f16", "q8_0")
MODELFILE = "Modelfile"
# A merged LLaVA model has a vision tower and projector: llama.cpp keeps those in a second file (mmproj) written
# by its own scripts, so the kit exports only language models.
VLM_NOTE = ("a merged VLM cannot be exported by the kit: GGUF keeps a LLaVA model's vision tower and projector in "
            "a separate mmproj file that only llama.cpp's own conversion scripts write; export its language model "
            "(a text-only final_model) instead.")


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why and what to do, in one sentence."""


def default_out_dir(model_dir: str | os.PathLike) -> Path:
    """WORK/export for WORK/final_model: beside the model, never inside it (its files are hashed by the merge check)."""
    return Path(model_dir).resolve().parent / "export"


def _permute(weight, n_head: int):
    """Rotary halves -> interleaved pairs for q/k, as llama.cpp's convert does for Llama (transformers undoes it)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _vocab(tokenizer, byte_fallback: bool):
    """(tokens, token types) in id order, as llama.cpp's convert marks them: the special tokens as control, and
    for a sentencepiece-style vocabulary <unk> as unknown and the <0xNN> byte pieces as bytes."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tokens, types = [], []
    for i in range(len(tokenizer)):
        if i not in by_id:  # a gap in the ids: llama.cpp writes a padding token there
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        tokens.append(token)
        if byte_fallback and token == tokenizer.unk_token:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in special:
            types.append(gguf.TokenType.CONTROL)
        elif byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _write_tokenizer(writer, tokenizer, model_dir: Path) -> None:
    """The vocabulary as llama.cpp reads it: byte-level BPE (the tiny model, Qwen) as "gpt2"; a sentencepiece-style
    BPE with byte fallback (InternLM2, Llama 2) as "llama", each piece scored by its merge's rank (llama.cpp merges
    the best-scored pair first, as BPE merges the lowest rank), no space put in front when the tokenizer puts none."""
    import gguf

    bpe = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    byte_fallback = bool(bpe.get("byte_fallback"))
    tokens, types = _vocab(tokenizer, byte_fallback)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if byte_fallback:
        merged = {}
        for rank, merge in enumerate(bpe.get("merges") or []):
            merged.setdefault("".join(merge.split(" ") if isinstance(merge, str) else merge), rank)
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([-float(merged.get(t, 0)) for t in tokens])
        normalizer = json.dumps(json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["normalizer"])
        writer.add_add_space_prefix("Prepend" in normalizer)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _tensor_type(name: str, data, quant: str):
    """llama.cpp's choice: 1-D tensors (norms) stay f32; matrices in the file's type (q8_0 needs rows of 32)."""
    import gguf

    if data.ndim == 1 or quant == "f32":
        return gguf.GGMLQuantizationType.F32
    if quant == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def write_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, quant: str = "f16") -> Path:
    """One GGUF file for a Llama-layout model folder (the tiny model; InternLM2 after the kit's conversion; Qwen2
    is refused in one sentence). Written to a temporary name and renamed, so a stopped export leaves no half file."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir, out_file = Path(model_dir), Path(out_file)
    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "vision_config", None) is not None:
        raise ExportError(f"{model_dir}: {VLM_NOTE}")
    if config.model_type != "llama":
        raise ExportError(f"{model_dir}: a {config.model_type} model; the kit writes GGUF for the Llama layout (the "
                          "course's models), use llama.cpp's convert_hf_to_gguf.py for this one.")
    if quant not in QUANTS:
        raise ExportError(f"quant {quant!r}: use one of {', '.join(QUANTS)}.")
    rope_scaling(config, model_dir)  # a kind GGUF lacks is refused before the model loads
    if not (model_dir / "tokenizer.json").exists():
        raise ExportError(f"{model_dir}: no tokenizer.json (a fast tokenizer) to write into the GGUF file; save the "
                          "model's tokenizer with AutoTokenizer.save_pretrained, or export with llama.cpp's script.")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tmp = out_file.with_name(out_file.name + ".partial")
    try:
        _write(gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]), model, tokenizer, config, model_dir,
               quant)
    except BaseException:  # a stopped or failed export leaves no half file behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out_file)
    return out_file


DYNAMIC_NOTE = ("its dynamic rope scaling is not written: GGUF has no dynamic NTK scaling, and it acts only beyond "
                "{n:,} tokens, so up to that length the GGUF file computes what the model does.")


def rope_scaling(config, model_dir: Path) -> tuple[str | None, float | None, str]:
    """(GGUF rope scaling type, factor, a note) for the model's rope settings; ExportError for kinds GGUF lacks."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None, None, ""
    if kind == "linear":
        return "linear", float(params["factor"]), ""
    if kind == "dynamic":  # InternLM2-7b and -20b: NTK scaling that starts past the trained context
        return None, None, DYNAMIC_NOTE.format(n=config.max_position_embeddings)
    raise ExportError(f"{model_dir}/config.json: rope scaling {kind!r} is not one the kit writes to GGUF (none, "
                      "linear, dynamic); export this model with llama.cpp's convert_hf_to_gguf.py.")


def _write(writer, model, tokenizer, config, model_dir: Path, quant: str) -> None:
    """The metadata, tokenizer and tensors of one GGUF file, in the order GGUFWriter writes them."""
    import gguf
    import numpy as np

    from .template import end_of_turn_token

    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_name(model_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta")
                                    or getattr(config, "rope_theta", 10000.0)))
    kind, factor, _ = rope_scaling(config, model_dir)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)

    _write_tokenizer(writer, tokenizer, model_dir)
    writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer)))  # llama.cpp stops there

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd for the output when output.weight is absent
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        data = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"{model_dir}: tensor {name} has no GGUF name for a Llama model; export it with "
                              "llama.cpp's convert_hf_to_gguf.py.")
        qtype = _tensor_type(new_name, data, quant)
        writer.add_tensor(new_name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ollama_modelfile(model_dir: str | os.PathLike, gguf_name: str, system: str) -> str:
    """An Ollama Modelfile for the GGUF: the chat layout as a Go template (Ollama does not run Jinja), the stop
    token, greedy answers as `helpers chat` gives, and the trained system prompt."""
    from transformers import AutoTokenizer

    from .template import end_of_turn_token

    eot = end_of_turn_token(AutoTokenizer.from_pretrained(model_dir))
    template = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}" + eot + "\n{{ end }}"
                "<|im_start|>assistant\n")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""', f'PARAMETER stop "{eot}"',
             "PARAMETER temperature 0", "PARAMETER num_predict 256"]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def export_gguf(model_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                quants=QUANTS, system: str | None = None) -> dict:
    """GGUF files (one per quant) and a Modelfile (for the first quant) in `out_dir` (default WORK/export)."""
    from .base_model import check_model_dir
    from .chat_defaults import trained_system_prompt
    from .data import atomic_write_text

    model_dir = check_model_dir(model_dir)
    out_dir = Path(out_dir) if out_dir else default_out_dir(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    system = (trained_system_prompt(model_dir) or "") if system is None else system
    stem = Path(model_dir).name
    files = {q: write_gguf(model_dir, out_dir / f"{stem}-{q}.gguf", q) for q in quants}
    modelfile = out_dir / MODELFILE
    atomic_write_text(modelfile, ollama_modelfile(model_dir, files[quants[0]].name, system))
    from transformers import AutoConfig

    note = rope_scaling(AutoConfig.from_pretrained(model_dir), model_dir)[2]
    return {"gguf": {q: str(p) for q, p in files.items()}, "modelfile": str(modelfile), "system": system,
            "note": f"{Path(model_dir).name}: {note}" if note else ""}


def add_command(sub) -> None:
    p = sub.add_parser("export", help="export a model for llama.cpp / Ollama (GGUF f16 and q8_0, plus a Modelfile)")
    p.add_argument("model_dir", nargs="?", default=None, help="model directory (default: WORK/final_model)")
    p.add_argument("--gguf", action="store_true", help="write GGUF files and an Ollama Modelfile")
    p.add_argument("--quant", nargs="+", choices=QUANTS, default=list(QUANTS), help="which GGUF types to write")
    p.add_argument("--out", default=None, help="output folder (default: the model's sibling folder 'export')")
    p.add_argument("--unverified", action="store_true",
                   help="export a final_model whose merge check is missing or out of date")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from .base_model import ModelPathError
    from .chat import _default_model_dir
    from .merge import UnverifiedModelError, require_verified
    from .progress import quiet_libraries
    from .template import TemplateError

    quiet_libraries()
    if not args.gguf:
        print("error: say what to export: --gguf (the one format the kit writes).", file=sys.stderr)
        return 2
    model_dir = args.model_dir or _default_model_dir()
    try:
        warning = require_verified(model_dir, args.unverified)
        result = export_gguf(model_dir, args.out, tuple(args.quant))
    except (ExportError, ModelPathError, UnverifiedModelError, TemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if warning:
        print(warning)
    for quant, path in result["gguf"].items():
        print(f"{quant}: {path} ({Path(path).stat().st_size / 2**20:.1f} MiB)")
    if result["note"]:
        print(f"note: {result['note']}")
    print(f"Ollama: cd {Path(result['modelfile']).parent} && ollama create my-assistant -f {MODELFILE}")
    print(json.dumps({"system": result["system"]}, ensure_ascii=False))
    return 0
