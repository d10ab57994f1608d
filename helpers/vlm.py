"""The LLaVA model: a CLIP vision tower + a 2-layer GELU projector + the chat LLM, in transformers' own classes.

`build_vlm` puts the three together as a LlavaForConditionalGeneration with a LlavaProcessor (image processor,
the LLM's tokenizer, a chat template that accepts images) and saves them so the auto classes load them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .base_model import check_model_dir
from .paths import staged_dir
from .template import stop_token_ids
from .vlm_data import IMAGE_TOKEN

TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=2, projection_dim=32)
VISION_RECORD = "course_vision.json"
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# Turns list-of-parts messages ({"type": "image"} / {"type": "text"}) into plain strings, then renders the
# LLM's own template, so image chats and text chats share one layout.
_FLATTEN_PARTS = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
    "{%- else -%}{%- set text = namespace(value='') -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '" + IMAGE_TOKEN + "\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = text.value -%}{%- endif -%}"
    "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': text}] -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.messages -%}"
)


class VlmError(ValueError):
    """A vision encoder or LLM that cannot be put into a LLaVA model; the message says what to fix."""


def build_vision_tower(out_dir: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """A tiny CLIP vision tower with random weights and its image processor (cached by recipe)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out_dir = Path(out_dir)
    recipe = {"kind": "tiny-clip-vision", "seed": seed, "config": TINY_VISION | overrides}
    record = out_dir / VISION_RECORD
    if record.exists() and json.loads(record.read_text()) == recipe:
        return out_dir
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**recipe["config"])
    model = CLIPVisionModel(config)
    size = config.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                      image_mean=CLIP_MEAN, image_std=CLIP_STD)
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / VISION_RECORD).write_text(json.dumps(recipe, indent=1))
    return out_dir


def multimodal_chat_template(tokenizer) -> str:
    """The LLM's chat template, extended to accept image parts (rendered as '<image>\\n')."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise VlmError(f"The tokenizer in {tokenizer.name_or_path} has no chat_template; use the chat LLM's own tokenizer.")
    return _FLATTEN_PARTS + template


def _vision_parts(vision_path: Path):
    from transformers import AutoConfig, CLIPVisionModel

    # the submodule import: transformers' top-level name is a placeholder when torchvision is absent
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    check_model_dir(vision_path, need_tokenizer=False)
    if not (vision_path / "preprocessor_config.json").exists():
        raise VlmError(f"{vision_path}: has no preprocessor_config.json; use a CLIP model folder that includes "
                       "its image processor (e.g. clip-vit-large-patch14-336).")
    config = AutoConfig.from_pretrained(vision_path)
    config = getattr(config, "vision_config", config)  # a full CLIP (text + vision) keeps its vision half
    if config.model_type not in ("clip_vision_model", "clip"):
        raise VlmError(f"{vision_path}: is a {config.model_type!r} model; the vision encoder must be a CLIP model.")
    vision = CLIPVisionModel.from_pretrained(vision_path, config=config)
    return config, vision, AutoImageProcessor.from_pretrained(vision_path)


def build_vlm(llm_path: str | os.PathLike, vision_path: str | os.PathLike, out_dir: str | os.PathLike,
              seed: int = 0, vision_feature_layer: int = -2) -> Path:
    """LLM + CLIP vision tower + a fresh projector -> a LLaVA model and processor saved in `out_dir`."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    llm_path, vision_path = Path(llm_path), Path(vision_path)
    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(llm_path))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision_config, vision, image_processor = _vision_parts(vision_path)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    config = LlavaConfig(vision_config=vision_config.to_dict(), text_config=llm.config.to_dict(),
                         image_token_index=image_token_id, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=vision_feature_layer,
                         image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    model.model.vision_tower.load_state_dict(vision.state_dict())
    stop = stop_token_ids(tokenizer, None)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False,
                                               max_new_tokens=64)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision_config.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=multimodal_chat_template(tokenizer))
    return save_vlm(model, processor, out_dir)


def save_vlm(model, processor, out_dir: str | os.PathLike, finish=None) -> Path:
    """Save model + processor in Hugging Face format, atomically (temp dir, then rename). finish(folder): writes
    what belongs beside them (a projector, the training record) into the staged folder, before it is swapped in."""
    with staged_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if finish is not None:
            finish(tmp)
    return Path(out_dir)


def load_vlm(path: str | os.PathLike, dtype=None, quantization_config=None, processor=None):
    """(model, processor) from a saved LLaVA folder, via the auto classes (`processor`: one already loaded)."""
    import torch
    from transformers import AutoModelForImageTextToText

    path = check_model_dir(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype or torch.float32, quantization_config=quantization_config,
        device_map="auto" if quantization_config is not None else None)
    return model, processor or load_vlm_processor(path)


def load_vlm_processor(path: str | os.PathLike):
    """The processor (tokenizer, image processor, chat template) of a saved LLaVA folder, without its weights."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(check_model_dir(path))


def image_prompt(processor, question: str, system: str = "", history: list[dict] | None = None,
                 with_image: bool = True) -> str:
    """The chat-template text for one question about the image (the image goes in the first user turn)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += list(history or [])
    parts = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": parts})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def open_image(path: str | os.PathLike):
    """The picture as RGB, or VlmError with one sentence."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise VlmError(f"{path}: no such image file; give the path of a PNG or JPEG picture.")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise VlmError(f"{path}: is not a readable image ({type(e).__name__}); give a valid PNG or JPEG.") from None


def answer_about_image(model, processor, image, questions: list[str], system: str = "",
                       max_new_tokens: int = 48, streamer=None, batch_size: int | None = None) -> list[str]:
    """Greedy answers, one per question, each asked alone about the image (what the before/after table shows),
    generated together with left padding (batch_size=1, or a streamer: one by one); in float32 token for token
    the one-at-a-time answers."""
    import time

    import torch

    from .generation import BATCH_SIZE, TIMINGS, generation_cache

    begin = time.perf_counter()
    image = open_image(image) if isinstance(image, (str, os.PathLike)) else image
    tokenizer = processor.tokenizer
    stop = stop_token_ids(tokenizer, model.generation_config)
    batch_size = 1 if streamer is not None else max(1, batch_size or BATCH_SIZE)  # a streamer follows one answer
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    answers = []
    with torch.no_grad():
        for first in range(0, len(questions), batch_size):
            batch = questions[first:first + batch_size]
            enc = processor(images=[image] * len(batch), text=[image_prompt(processor, q, system) for q in batch],
                            return_tensors="pt", add_special_tokens=False, padding=True,
                            padding_side="left").to(device)
            enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=pad, streamer=streamer, **generation_cache(model))
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                row = row[:next((i for i, t in enumerate(row) if t in stop), len(row))]
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    if was_training:
        model.train()
    TIMINGS["image answers"] = TIMINGS.get("image answers", 0.0) + time.perf_counter() - begin
    return answers


def prepare_vlm(work, llm=None, vision_encoder="tiny", seed: int = 0) -> dict:
    """Build WORK/vlm/base_model from the LLM (None: notebook 00's base model) and the vision encoder
    ("tiny": a tiny CLIP tower built here; else a local CLIP folder). Returns where everything came from."""
    from .base_model import base_model_path

    llm_path = Path(llm) if llm else Path(base_model_path(work))
    if vision_encoder in (None, "", "tiny"):
        vision_path = build_vision_tower(work.vlm_vision, seed=seed)
    else:
        vision_path = Path(vision_encoder).expanduser()
    base = build_vlm(llm_path, vision_path, work.vlm_base_model, seed=seed)
    config = json.loads((base / "config.json").read_text())
    v, t = config["vision_config"], config["text_config"]
    return {"llm": str(llm_path), "vision_encoder": str(vision_path), "base_model": str(base),
            "image_size": v["image_size"], "patch_size": v["patch_size"],
            "image_tokens": (v["image_size"] // v["patch_size"]) ** 2,
            "vision_hidden": v["hidden_size"], "llm_hidden": t["hidden_size"],
            "projector": f"Linear({v['hidden_size']}, {t['hidden_size']}) -> GELU -> Linear({t['hidden_size']}, {t['hidden_size']})"}
