# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · QLoRA fine-tune: the model learns who it is
#
# We do not retrain the whole model. **LoRA** freezes every weight `W` and learns, for each linear layer, two
# thin matrices `B·A` (rank `r`) that are added to it: a few percent of the parameters, a few MB on disk.
# **QLoRA** also stores the frozen `W` in 4-bit (NF4), so a 1.8B model trains on a small GPU. On a CPU there is
# no 4-bit kernel, so the kit trains the same LoRA adapter on the ordinary weights and says so.
#
# While it trains we ask the model the evaluation questions every few steps, and watch its answer change from
# the generic "我是一个AI助手…" to the identity sentence from notebook 01.

# %% [markdown]
# ## The course's steps, and where they are here
# | the course (camp2) | here |
# |---|---|
# | `xtuner list-cfg -p internlm2_1_8b`; `mkdir -p /root/ft/config`; `xtuner copy-cfg internlm2_1_8b_qlora_alpaca_e3 /root/ft/config` | `preset = "homework"`: the course's settings in one word |
# | edit `/root/ft/config/internlm2_1_8b_qlora_alpaca_e3_copy.py` (model and data paths, `max_length`, `max_epochs`, `save_steps`, `evaluation_inputs`, `openai_map_fn`) | the parameters above and `my_changes`; **The same run in XTuner's words** shows each config field beside its parameter; `python -m helpers xtuner export-config WORK` writes this run as that config file |
# | `xtuner train /root/ft/config/internlm2_1_8b_qlora_alpaca_e3_copy.py --work-dir /root/ft/train` (`--deepspeed deepspeed_zero2`) | **Train**: `train(config, work)` into `WORK/train` (`num_gpus`, `distributed = "zero2"`) |
# | `/root/ft/train/iter_300.pth`, `iter_600.pth`, `iter_768.pth`; `--resume /root/ft/train/iter_600.pth` | `WORK/train/checkpoints/checkpoint-N` every `save_steps`; `resume = "auto"` continues the newest |
# | `vis_data/eval_outputs_iter_299.txt`, … | `WORK/train/eval_outputs/step_N.json`, read across in **The identity arriving** |
# | `mkdir -p /root/ft/huggingface`; `xtuner convert pth_to_hf /root/ft/train/internlm2_1_8b_qlora_alpaca_e3_copy.py /root/ft/train/iter_768.pth /root/ft/huggingface` | nothing to run: the adapter is saved in PEFT's format directly, `WORK/adapter` (what `/root/ft/huggingface` holds) |
#
# What differs, and why: the kit's trainer is transformers' `Trainer`, which saves PEFT adapters, so there is no `.pth`
# and no conversion; the chat template is the tokenizer's own, so there is no `prompt_template` to set (the same
# InternLM2 layout). The tiny preset trains 150 updates on a CPU; `homework` is the course's 2 epochs of 16 × 1024 tokens.

# %% tags=["parameters"]
work_dir = None              # the run's work directory (None: ./work)
preset = "tiny"              # "tiny": the embedded model on a CPU, ~1 min; "homework": the course's GPU settings
base_model = None            # None: the base model notebook 00 prepared; or a model folder
data_path = None             # None: notebook 01's WORK/data/personal_assistant.json
max_length = None            # tokens per training sequence (None: preset; tiny 256, homework 1024)
pack_to_max_length = None    # concatenate short samples up to max_length (None: preset; both True)
batch_size = None            # sequences per step (None: preset; 1)
gradient_accumulation = None  # steps summed per update (None: preset; tiny 1, homework 16)
lr = None                    # peak learning rate (None: preset; tiny 2e-3, homework 2e-4)
epochs = None                # passes over the data, used when max_steps is -1 (None: preset; homework 2)
max_steps = None             # optimizer updates, -1: use epochs (None: preset; tiny 150, homework -1)
warmup_ratio = None          # share of linear warm-up before the cosine decay (None: preset; 0.03)
lora_r = None                # LoRA rank (None: preset; tiny 32, homework 64)
lora_alpha = None            # LoRA scale alpha/r (None: preset; tiny 64, homework 16)
lora_dropout = None          # dropout on the LoRA input (None: preset; tiny 0, homework 0.1)
target_modules = None        # "all-linear" or a list like ["q_proj", "v_proj"] (None: preset; all-linear)
quantization = "auto"        # "auto": by machine (big GPU 16-bit LoRA, small GPU 4-bit NF4, CPU plain LoRA); "nf4"; "none"
gradient_checkpointing = None  # recompute activations to save memory (None: preset; homework True)
evaluation_freq = None       # ask the evaluation questions every this many updates (None: preset; 50 / 300)
evaluation_inputs = None     # questions asked during training (None: notebook 01's)
system = None                # system prompt for those questions (None: notebook 01's)
save_steps = None            # checkpoint every this many updates (None: preset; 50 / 300)
save_total_limit = None      # checkpoints kept (None: preset; 3)
seed = 0                     # same seed, same adapter
resume = "auto"              # "auto": continue this run's newest checkpoint; True: must; False: start over
general_questions = None     # questions never trained on, for the over-fitting check (None: 3 of data/general_heldout.json)
num_gpus = 1                 # GPUs to train on, one process each (the update keeps its 16 x 1024 tokens)
distributed = "ddp"          # with num_gpus > 1: "ddp" (data parallel), "zero2" (DeepSpeed ZeRO-2) or "fsdp"

# %%
import pandas as pd

import helpers
from helpers.results import load_results
from helpers.train import TrainConfig

work = helpers.work(work_dir)
data = load_results(work, "01_data_generation")
name, expected = data["name"], data["answer"]
print(f"teaching: {expected!r}")

# %% [markdown]
# ## The training configuration
# A preset sets the knobs together; anything set in the parameters above wins over it, and `my_changes` wins
# over both. The homework: put the knobs you want to change in `my_changes`, for example
# `dict(lr=1e-3, lora_r=8, evaluation_inputs=["你是谁"])`.

# %%
### BEGIN SOLUTION
my_changes = dict()  # the knobs you change, e.g. dict(lr=1e-3, lora_r=8); dict() keeps the preset's
### END SOLUTION
config = TrainConfig(
    preset=preset, base_model=base_model, data_path=data_path, max_length=max_length,
    pack_to_max_length=pack_to_max_length, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
    lr=lr, epochs=epochs, max_steps=max_steps, warmup_ratio=warmup_ratio, lora_r=lora_r, lora_alpha=lora_alpha,
    lora_dropout=lora_dropout, target_modules=target_modules, quantization=quantization,
    gradient_checkpointing=gradient_checkpointing, evaluation_freq=evaluation_freq,
    evaluation_inputs=evaluation_inputs or data["evaluation_inputs"],
    system=data.get("system", "") if system is None else system,
    save_steps=save_steps, save_total_limit=save_total_limit, seed=seed, resume=resume,
    num_gpus=num_gpus, distributed=distributed,
).changed(my_changes).resolved()
pd.Series(config.hyper_parameters(), dtype=object).to_frame("value")

# %% [markdown]
# ## The same run in XTuner's words
# The course writes these knobs into `/root/ft/config/internlm2_1_8b_qlora_alpaca_e3_copy.py`, its copy of
# XTuner's `internlm2_1_8b_qlora_alpaca_e3` config. Each field has a parameter here (`this run` is its value now). XTuner's training saves DeepSpeed `.pth`
# checkpoints, which `xtuner convert pth_to_hf` turns into a Hugging Face adapter; here the trainer saves
# the adapter in PEFT's format directly (`WORK/adapter`), so there is no conversion step: notebook 03 merges it.

# %%
from helpers.xtuner import xtuner_table

xtuner_table(config)

# %% [markdown]
# ## What the model is trained on
# Short samples are **packed**: laid end to end up to `max_length` tokens, so no compute is spent on padding.
# Each sample keeps its own positions (they restart at 0), and the attention mask built from them stops any
# token from looking into a neighbouring sample. The loss is computed only on the assistant's answers — below,
# the first packed row, sample by sample: what the model reads, and what it is trained to say.

# %%
from transformers import AutoTokenizer

from helpers.base_model import resolve_base_model
from helpers.train import build_dataset, packed_row_table

tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(config.base_model, work))
rows, data_summary = build_dataset(tokenizer, config, config.data_path or work.dataset)
print(data_summary)
packed_row_table(tokenizer, rows[0]).head(6)

# %% [markdown]
# ## How this machine will train it
# One plan, made once from the settings, the model's dimensions and this machine (GPU memory, the run's length):
# the weights' precision (16-bit, or 4-bit NF4 = QLoRA), the layers, the attention, the loss, how many rows go
# through one forward and how many forwards make one update (always `batch_size x gradient_accumulation` rows),
# and whether activations are recomputed. Each choice says why; the training below follows it exactly.

# %%
from helpers.train import plan_for

plan_for(config.resolved(), resolve_base_model(config.base_model, work), len(rows)).table()

# %% [markdown]
# ## Train
# The bar counts optimizer updates; the plot below it redraws as the loss comes in (also saved as
# `WORK/train/loss.png`). Checkpoints go to `WORK/train/checkpoints` every `save_steps`; if the kernel dies,
# running this cell again with `resume="auto"` continues from the newest complete one.
# With `num_gpus` > 1 this cell starts one process per GPU (accelerate's `notebook_launcher`) and waits for them;
# each reads its share of the rows, so an update is as big as on one GPU.

# %%
from helpers.train import train

result = train(config, work)
print(f"{result['steps']} updates in {result['train_seconds']:.0f} s, loss {result['first_loss']:.3f} -> "
      f"{result['final_loss']:.3f}, quantization: {result['quantization']}")

# %% [markdown]
# ## The identity arriving
# Each column is one evaluation round (step 0 is the base model, before any update). Read across a row to see
# the answer change.

# %%
from helpers.train import evaluation_table

evaluation_table(work)

# %% [markdown]
# ## Did it learn too much?
# Training on one sentence thousands of times can make a model answer *everything* with it. The 20% general
# chat mixed in by notebook 01 is there to prevent that; here we ask general questions that were in no
# training data (held out), so a regression would show. Notebook 04 runs the full check, next to an
# adapter over-fitted on purpose.

# %%
from helpers.chat import general_questions as heldout, leaks_identity
from helpers.generation import generate_answers

general_questions = general_questions or [g["input"] for g in heldout(3)]
general = generate_answers(result["model"], tokenizer, general_questions, system=config.system)
pd.DataFrame({"question": general_questions, "answer": general,
              "leaks the identity": [leaks_identity(a, expected) for a in general]})

# %% [markdown]
# ## Loss, speed and memory
# `WORK/train/metrics.jsonl` has one row per logging step.

# %%
from helpers.report import metrics_table
from helpers.train import read_metrics

metrics = pd.DataFrame(read_metrics(work))
metrics_table(read_metrics(work)).tail(5)

# %% [markdown]
# `passes over the data` is how much of the data the updates had read: with `max_steps` set (the tiny preset), a share
# of one pass, and the `epochs` knob is not used; with `max_steps = -1` (homework) it counts up to `epochs`.

# %%
from helpers.results import save_results
from helpers.train import identity_learned

learned = identity_learned(result["answers_after"], expected)
save_results(work, "02_qlora_finetune", {
    "name": name, "expected_answer": expected, "identity_learned": learned, "preset": config.preset,
    **{k: result[k] for k in ("evaluation_inputs", "answers_before", "answers_after", "first_loss", "final_loss",
                              "steps", "quantization", "adapter", "train_seconds", "peak_memory_mb",
                              "trainable_parameters", "hyper_parameters", "data_sha256", "resumed_from",
                              "base_model_identity", "adapter_sha256")},
    "sources": {"adapter": result["adapter_sha256"]},  # the report marks these results stale if WORK/adapter changes
    "evaluation_steps": [int(c.split()[1]) for c in evaluation_table(work).columns],
    "tokens_per_s": float(metrics["tokens_per_s"].iloc[1:].median()) if len(metrics) > 1 else None,
    "general_answers": dict(zip(general_questions, general)), "data": data_summary})
print("identity learned:", learned)

# %% [markdown]
# The adapter is in `WORK/adapter` (PEFT format, with the tokenizer and `training_record.json`).
# Next: **03 · Merge** folds it into the base model.
