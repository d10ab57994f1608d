"""Training the LLaVA model in two stages, on the kit's training machinery (helpers.train).

Stage 1 (pre-alignment): only the projector learns, on caption pairs; the LLM and the vision tower are frozen.
Stage 2 (fine-tune): LoRA on the LLM (4-bit NF4 when CUDA + bitsandbytes are there), LoRA on the vision
tower, and the projector trained in full; the loss is on the assistant turns only.
"""
from __future__ import annotations

import json
import os
import time
import weakref
from pathlib import Path

from .data import IGNORE_INDEX, atomic_write_text, encode_messages
from .fingerprint import file_sha256, folder_sha256, model_identity
from .paths import Work
from .train import TrainConfig, TrainConfigError, peak_memory_mb, share_gpu
from .vlm import answer_about_image, load_vlm, load_vlm_processor, open_image, save_vlm
from .vlm_data import IMAGE_TOKEN, load_llava_data

# Per-stage defaults on top of TrainConfig's "tiny" preset (CPU, embedded models) and "homework" preset (GPU).
STAGE_DEFAULTS = {
    ("tiny", 1): dict(lr=1e-2, max_steps=30, batch_size=4, evaluation_freq=15, max_length=512, logging_steps=5),
    ("tiny", 2): dict(lr=1e-2, max_steps=80, batch_size=4, evaluation_freq=20, max_length=512, logging_steps=5,
                      lora_r=16, lora_alpha=32, lora_dropout=0.0),
    ("homework", 1): dict(lr=1e-3, epochs=1, max_steps=-1, batch_size=8, gradient_accumulation=4, max_length=1024),
    ("homework", 2): dict(lr=2e-4, epochs=1, max_steps=-1, batch_size=1, gradient_accumulation=16, max_length=1024,
                          lora_r=64, lora_alpha=16, lora_dropout=0.05),
}
DATA_REPEATS = {"tiny": 20, "homework": 200}  # each scripted conversation repeated (the course: 200)
LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PROJECTOR = "multi_modal_projector"
PROJECTOR_FILE = "projector.safetensors"
# Kept in 16-bit when the LLM goes 4-bit (transformers matches these as name prefixes).
NOT_QUANTIZED = ["model.vision_tower", f"model.{PROJECTOR}", "lm_head"]
# Trained in full (stage 1: alone; stage 2: besides the LoRA layers). The tiny LLM never produced the
# picture's words, and neither a projector nor a 64-wide LoRA reaches them through a frozen output layer,
# so on the tiny preset the output layer learns too.
FULLY_TRAINED = {"tiny": [PROJECTOR, "lm_head"], "homework": [PROJECTOR]}


def stage_config(stage: int, preset: str = "tiny", **overrides) -> TrainConfig:
    """The TrainConfig of one stage: the preset, the stage's defaults, then your overrides (None: keep)."""
    if stage not in (1, 2):
        raise TrainConfigError(f"stage is {stage!r}; the VLM track has stage 1 (projector) and stage 2 (LoRA).")
    if (preset, stage) not in STAGE_DEFAULTS:
        raise TrainConfigError(f"preset is {preset!r}; use 'tiny' (CPU) or 'homework' (GPU).")
    values = STAGE_DEFAULTS[(preset, stage)] | {k: v for k, v in overrides.items() if v is not None}
    values.setdefault("save_steps", values.get("evaluation_freq", 300))
    return TrainConfig(preset=preset, resume=False, **values).resolved()


# ---------------------------------------------------------------- data
def image_token_count(processor, image) -> int:
    """How many <image> placeholders the processor puts in for one picture (one per projected patch)."""
    image = open_image(image) if isinstance(image, (str, os.PathLike)) else image
    enc = processor(images=image, text=IMAGE_TOKEN, add_special_tokens=False)
    return sum(int(t == processor.image_token_id) for t in enc["input_ids"][0])


def encode_llava_samples(processor, data_file, max_length: int) -> list[dict]:
    """Each record as input_ids / labels (loss on assistant turns only) / pixel_values, from the chat template."""
    tokenizer, image_id = processor.tokenizer, processor.image_token_id
    pictures: dict[Path, tuple] = {}
    rows = []
    for i, (image_path, messages) in enumerate(load_llava_data(data_file)):
        if image_path not in pictures:
            image = open_image(image_path)
            pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
            pictures[image_path] = (pixels, image_token_count(processor, image))
        pixels, n = pictures[image_path]
        enc = encode_messages(tokenizer, messages)
        ids, labels = [], []
        for t, lab in zip(enc["input_ids"], enc["labels"]):  # one placeholder -> one per image patch
            ids += [t] * (n if t == image_id else 1)
            labels += [IGNORE_INDEX] * n if t == image_id else [lab]
        if len(ids) > max_length:
            raise TrainConfigError(f"{data_file}: record {i} is {len(ids)} tokens with its {n} image tokens, more "
                                   f"than max_length={max_length}; raise max_length or shorten the conversation.")
        rows.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})
    return rows


class LlavaCollator:
    """Pads input_ids/labels to the longest row, adds the attention mask, stacks the pictures."""

    def __init__(self, pad_token_id: int, dtype=None):
        self.pad, self.dtype = pad_token_id, dtype

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        pad = [width - len(r["input_ids"]) for r in rows]
        pixels = torch.stack([r["pixel_values"] for r in rows])
        return {"input_ids": torch.tensor([r["input_ids"] + [self.pad] * n for r, n in zip(rows, pad)]),
                "labels": torch.tensor([r["labels"] + [IGNORE_INDEX] * n for r, n in zip(rows, pad)]),
                "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * n for r, n in zip(rows, pad)]),
                "pixel_values": pixels.to(self.dtype) if self.dtype is not None else pixels}


# ---------------------------------------------------------------- the model of each stage
def lora_target_pattern(vision_lora: bool = True) -> str:
    """A regex over module names: the LLM's linear layers, and the vision tower's when vision_lora."""
    parts = [rf".*language_model\..*\.({'|'.join(LLM_LINEAR)})"]
    if vision_lora:
        parts.append(rf".*vision_tower\..*\.({'|'.join(VISION_LINEAR)})")
    return "|".join(f"(?:{p})" for p in parts)


def load_stage_model(model_dir, stage: int, config: TrainConfig, plan, vision_lora: bool = True,
                     fully_trained: list[str] | None = None, processor=None):
    """(model, processor) ready to train as `plan` says: stage 1 the projector only; stage 2 LoRA + projector,
    the LLM in the plan's weights (4-bit NF4 keeps the vision tower, projector and output layer in 16 bits)."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from .train.model import dtype_of, quantization_config

    quantized = quantization_config(plan, skip=NOT_QUANTIZED) if plan.weights == "nf4" else None
    model, processor = load_vlm(model_dir, dtype=dtype_of("bf16" if plan.weights == "nf4" else plan.weights),
                                quantization_config=quantized, processor=processor)
    if plan.device == "cuda" and quantized is None:
        model.to("cuda")
    model.config.use_cache = False
    if stage == 1:
        trained = fully_trained or FULLY_TRAINED[config.preset]
        for name, p in model.named_parameters():
            p.requires_grad = any(part in name.split(".") for part in trained)
        return model, processor
    if plan.recomputation:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    set_seed(config.seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_target_pattern(vision_lora),
                      modules_to_save=fully_trained or FULLY_TRAINED[config.preset])
    return get_peft_model(model, lora), processor


def trainable_summary(model) -> dict:
    """Trainable parameters per part (llm / vision / projector) and in all."""
    parts = {"llm": 0, "vision": 0, "projector": 0}
    total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            part = "projector" if PROJECTOR in name else "vision" if "vision_tower" in name else "llm"  # lm_head: llm
            parts[part] += p.numel()
    return parts | {"trainable": sum(parts.values()), "total": total}


# ---------------------------------------------------------------- training
class _StagePaths:
    """The files of one stage under WORK/vlm/train/stage<N>."""

    def __init__(self, root: Path):
        self.root, self.checkpoints, self.eval_outputs = root, root / "checkpoints", root / "eval_outputs"
        self.metrics, self.loss_plot = root / "metrics.jsonl", root / "loss.png"


def _image_evaluation_callback(image, config: TrainConfig, out_dir: Path, processor):
    from .train.callbacks import EvaluationCallback

    class ImageEvaluation(EvaluationCallback):
        """The kit's evaluation rounds, answering the questions about the picture."""

        def evaluate(self, model, step: int) -> None:
            if step in self.done:
                return
            answers = answer_about_image(model, processor, image, config.evaluation_inputs, config.system,
                                         max_new_tokens=config.max_new_tokens)
            atomic_write_text(out_dir / f"step_{step:06d}.json", json.dumps(
                {"step": step, "inputs": config.evaluation_inputs, "answers": answers}, ensure_ascii=False, indent=1))
            self.done.add(step)

    return ImageEvaluation(processor.tokenizer, config, out_dir)


def train_stage(work: Work, stage: int, model_dir, data_file, image, config: TrainConfig,
                vision_lora: bool = True, fully_trained: list[str] | None = None) -> dict:
    """Run one stage; stage 1 writes WORK/vlm/aligned_model, stage 2 WORK/vlm/adapter. Returns a summary."""
    import shutil

    import torch

    paths = _StagePaths(work.vlm_stage(stage))
    if paths.root.exists():  # each run of a stage starts over (the stages are minutes on a GPU)
        shutil.rmtree(paths.root)
    paths.eval_outputs.mkdir(parents=True)
    share_gpu()  # a class run's share of the card, when several students train on it
    from transformers import AutoConfig

    from .train.callbacks import MetricsCallback, ProgressCallback
    from .train.plan import make_plan
    from .train.trainer import course_trainer, training_arguments

    processor = load_vlm_processor(model_dir)  # the rows first: the plan sizes its forwards by the longest
    rows = encode_llava_samples(processor, data_file, config.max_length)
    plan = make_plan(config, AutoConfig.from_pretrained(str(model_dir)), stage=stage,
                     longest=max(len(r["input_ids"]) for r in rows))
    model, processor = load_stage_model(model_dir, stage, config, plan, vision_lora, fully_trained, processor)
    print(f"stage {stage}: {plan.summary()}")
    extra = {"save_strategy": "no"} if stage == 1 else {}  # stage 1's result is the aligned model itself
    config.extra = extra | dict(config.extra)
    pixel_dtype = next(p for n, p in model.named_parameters() if "vision_tower" in n).dtype
    trainer = course_trainer(model, training_arguments(config, paths.checkpoints, plan), rows,
                             LlavaCollator(processor.tokenizer.pad_token_id, pixel_dtype),
                             save_total_limit=config.save_total_limit)
    title = f"VLM stage {stage} loss ({'projector' if stage == 1 else 'LoRA + projector'})"
    for cb in (_image_evaluation_callback(image, config, paths.eval_outputs, processor),
               MetricsCallback(weakref.ref(trainer), paths.metrics, paths.loss_plot, title), ProgressCallback()):
        trainer.add_callback(cb)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = [json.loads(x) for x in paths.metrics.read_text().splitlines() if x.strip()]
    record = {"stage": stage, "quantization": "nf4" if plan.weights == "nf4" else "none", "plan": plan.as_dict(),
              "model": str(model_dir), "data_file": str(data_file),
              "samples": len(rows), "steps": trainer.state.global_step, "train_seconds": round(seconds, 1),
              "first_loss": metrics[0]["loss"] if metrics else None,
              "final_loss": metrics[-1]["loss"] if metrics else None,
              "peak_memory_mb": round(peak_memory_mb(), 1), "parameters": trainable_summary(model),
              "hyper_parameters": config.hyper_parameters(), "preset": config.preset,
              "evaluation_inputs": config.evaluation_inputs, "data_sha256": file_sha256(data_file),
              "image_sha256": file_sha256(image) if isinstance(image, (str, os.PathLike)) else None,
              "model_identity": model_identity(model_dir)}  # what it started from, by content
    out = work.vlm_aligned_model if stage == 1 else work.vlm_adapter

    def finish(folder: Path) -> None:  # inside the staged folder: a kill never leaves it without its record
        if stage == 1:
            _save_projector(model, folder / PROJECTOR_FILE)
        record["aligned_model_sha256" if stage == 1 else "adapter_sha256"] = folder_sha256(folder)
        atomic_write_text(folder / "training_record.json",
                          json.dumps(record, ensure_ascii=False, indent=1, default=str))

    save_vlm(model, processor, out, finish)  # stage 2: the PEFT adapter (LoRA + projector) and the processor
    return record | {"output": str(out), "model": model, "processor": processor,
                     "evaluations": stage_evaluations(work, stage)}


def _save_projector(model, path: Path) -> None:
    """The projector's weights alone (what stage 1 produces; the course ships it as 'pretrained_pth')."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def use_pretrained_projector(work: Work, projector, image=None, evaluation_inputs: list[str] | None = None,
                             system: str = "") -> dict:
    """Stage 1 as the course runs it: WORK/vlm/base_model with the course's pre-trained projector (XTuner's LLaVA
    pretrain output, helpers.xtuner.read_projector) becomes WORK/vlm/aligned_model, which stage 2 trains from.
    Its answers to `evaluation_inputs` about `image` are stage 1's one evaluation round (step 0)."""
    import shutil

    import torch

    from .vlm import VlmError
    from .xtuner import XTunerError, read_projector, source_sha256

    try:
        weights = read_projector(projector)
    except XTunerError as e:
        raise VlmError(str(e)) from None
    model, processor = load_vlm(work.vlm_base_model)
    layer = model.model.multi_modal_projector
    wanted = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    if {k: tuple(v.shape) for k, v in weights.items()} != wanted:
        got, want = weights["linear_1.weight"].shape, wanted["linear_1.weight"]
        raise VlmError(f"pretrained_projector {projector}: maps {got[1]} vision features to {got[0]}, but this LLaVA's "
                       f"vision encoder gives {want[1]} and its LLM takes {want[0]}; give the projector pre-trained "
                       "for this vision encoder and LLM (the course's: clip-vit-large-patch14-336 + internlm2-chat-1_8b).")
    with torch.no_grad():
        layer.load_state_dict({k: v.to(layer.linear_1.weight.dtype) for k, v in weights.items()})
    paths = _StagePaths(work.vlm_stage(1))
    if paths.root.exists():  # rounds of an earlier stage 1 would describe another projector
        shutil.rmtree(paths.root)
    paths.eval_outputs.mkdir(parents=True)
    if image is not None and evaluation_inputs:
        answers = answer_about_image(model, processor, image, evaluation_inputs, system)
        atomic_write_text(paths.eval_outputs / "step_000000.json", json.dumps(
            {"step": 0, "inputs": evaluation_inputs, "answers": answers}, ensure_ascii=False, indent=1))
    source = Path(projector).expanduser()
    record = {"stage": 1, "pretrained_projector": str(source), "steps": 0, "model": str(work.vlm_base_model),
              "projector_sha256": source_sha256(source),
              "evaluation_inputs": evaluation_inputs, "model_identity": model_identity(work.vlm_base_model)}

    def finish(folder: Path) -> None:  # inside the staged folder, as train_stage's stage 1 writes it
        _save_projector(model, folder / PROJECTOR_FILE)
        record["aligned_model_sha256"] = folder_sha256(folder)
        atomic_write_text(folder / "training_record.json", json.dumps(record, ensure_ascii=False, indent=1))

    save_vlm(model, processor, work.vlm_aligned_model, finish)
    return record | {"output": str(work.vlm_aligned_model)}


def stage_evaluations(work: Work, stage: int) -> list[dict]:
    """Every evaluation round of a stage, in step order."""
    out = _StagePaths(work.vlm_stage(stage)).eval_outputs
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("step_*.json"))]


def evaluation_table(work: Work, stage: int):
    """Answers per evaluation round: rows the questions, columns the steps."""
    import pandas as pd

    rounds = stage_evaluations(work, stage)
    table = pd.DataFrame({f"step {r['step']}": r["answers"] for r in rounds}, index=rounds[0]["inputs"])
    table.index.name = "question"
    return table


def loss_plot(work: Work, stage: int) -> Path:
    return _StagePaths(work.vlm_stage(stage)).loss_plot


# ---------------------------------------------------------------- after training
def load_adapter_vlm(work: Work):
    """The aligned model with the stage-2 adapter on top (unmerged), and the processor."""
    from peft import PeftModel

    model, processor = load_vlm(work.vlm_aligned_model)
    return PeftModel.from_pretrained(model, str(work.vlm_adapter)), processor


def merge_vlm(work: Work, adapter_vlm=None) -> Path:
    """aligned model + adapter (LoRA and projector) -> one plain LLaVA in WORK/vlm/final_model. adapter_vlm: the
    (model, processor) load_adapter_vlm gave, already in memory (merged in place: not usable afterwards)."""
    import torch

    model, processor = adapter_vlm or load_adapter_vlm(work)
    merged = model.merge_and_unload()
    merged.to(torch.float32 if not torch.cuda.is_available() else torch.bfloat16)
    record = work.vlm_adapter / "training_record.json"

    def finish(folder: Path) -> None:  # the adapter's record travels with the merged model, inside the swap
        if record.exists():
            (folder / "training_record.json").write_text(record.read_text(encoding="utf-8"), encoding="utf-8")

    return save_vlm(merged, processor, work.vlm_final_model, finish)


def before_after_table(questions: list[str], expected: list[str], stage1: list[str], stage2: list[str] | None = None,
                       control: tuple[list[str], list[str] | None] | None = None):
    """The same questions about the picture: expected answer, after stage 1, after stage 2 (when trained) and
    whether it matches; `control`: (stage 1, stage 2) answers about the control picture the model never saw."""
    import pandas as pd

    table = pd.DataFrame({"question": questions, "expected": expected, "stage 1 (projector only)": stage1})
    if stage2 is not None:
        table["stage 2 (fine-tuned)"] = stage2
        table["stage 2 matches"] = [a.strip() == e.strip() for a, e in zip(stage2, expected)]
    if control is not None:
        table["control picture, stage 1"] = control[0]
        if control[1] is not None:
            table["control picture, stage 2"] = control[1]
    return table


def show_llava_loss_mask(processor, data_file, record: int = 0):
    """One training record with its loss mask coloured; the run of image positions is shown once, with its count."""
    from .data import loss_mask_view

    row = encode_llava_samples(processor, data_file, max_length=10**6)[record]
    return loss_mask_view(processor.tokenizer, row["input_ids"], row["labels"], collapse_id=processor.image_token_id)


def public_record(record: dict) -> dict:
    """A stage's summary without the live objects (for the results file)."""
    return {k: v for k, v in record.items() if k not in ("model", "processor")}
