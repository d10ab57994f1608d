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
# # 05 · A vision-language model: teach a LLaVA model about one picture
#
# A LLaVA model is three parts: a **vision encoder** (CLIP) turns the picture into patch features, a small
# **projector** (two linear layers with GELU between) maps them into the LLM's embedding space, and the
# **chat LLM** reads them as if they were words, at the place of the `<image>` token.
#
# Training happens in two stages, as in the course:
# 1. **Pre-alignment** — only the projector learns, on picture/caption pairs. Afterwards the model can caption,
#    but it knows nothing else about the picture.
# 2. **Fine-tune** — LoRA on the LLM (in 4-bit on a GPU: QLoRA), LoRA on the vision encoder, and the projector,
#    on scripted conversations about the picture repeated many times. Afterwards it answers those questions.
#
# We compare the two on the same questions. On the defaults everything is tiny and runs on a CPU in minutes;
# pass a real LLM and `clip-vit-large-patch14-336` folder to do the real thing on a GPU.

# %% [markdown]
# ## The course's steps, and where they are here
# | the course (camp2: LLaVA fine-tune on one picture) | here |
# |---|---|
# | `git clone https://github.com/InternLM/tutorial -b camp2`; `python /root/tutorial/xtuner/llava/llava_data/repeat.py -i unique_data.json -o repeated_data.json -n 200` | **The data, in LLaVA format**: `conversations_file` (yours), `vlm_repeats` (homework: 200) |
# | the course's pre-trained projector: `xtuner convert pth_to_hf llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain /root/share/new_models/xtuner/iter_2181.pth …/iter_2181_hf` | **Stage 1**, or `pretrained_projector = ".../iter_2181.pth"` to load the course's instead |
# | before: `xtuner chat /root/share/new_models/Shanghai_AI_Laboratory/internlm2-chat-1_8b --visual-encoder /root/share/new_models/openai/clip-vit-large-patch14-336 --llava …/iter_2181_hf --prompt-template internlm2_chat --image …/test_img/oph.jpg` | the stage-1 answers (`image = ".../oph.jpg"` for the course's picture) |
# | `cp …/internlm2_chat_1_8b_llava_tutorial_fool_config.py …/llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune_copy.py`; `xtuner train …_finetune_copy.py --deepspeed deepspeed_zero2` | **Stage 2** (`preset = "homework"`) |
# | after: `xtuner convert pth_to_hf …_finetune_copy.py …/iter_1200.pth …/iter_1200_hf`; `xtuner chat … --llava …/iter_1200_hf … --image …/oph.jpg` | **Before and after**; **Chat about the picture** (`python -m helpers chat WORK/vlm/final_model --image PICTURE`) |
#
# What differs, and why: stage 2's adapter and projector are saved in PEFT's and safetensors' formats directly (no
# `pth_to_hf`), and merged into one LLaVA model that transformers loads alone. A control picture the model never saw is
# asked the same questions, because a model that only learned to recite would recite there too.

# %% tags=["parameters"]
work_dir = None                # the run's work directory (None: ./work)
llm = None                     # the chat LLM folder (None: the base model notebook 00 prepared)
vision_encoder = "tiny"        # "tiny" (a small CLIP tower built here) or a local clip-vit-large-patch14-336 folder
image = None                   # the picture (None: the one the kit draws, data/vlm_picture.png)
conversations_file = None      # scripted conversations, LLaVA format (None: the preset's; tiny 6 x 3 turns, homework 6 x 10 as the course)
captions_file = None           # stage-1 caption pairs, LLaVA format (None: data/vlm_captions.json)
vlm_repeats = None             # each conversation repeated this many times (None: the preset's; tiny 20, homework 200 as the course)
stages = [1, 2]                # which stages to run; [2] reuses an earlier stage 1 in this work_dir
preset = "tiny"                # "tiny" (CPU defaults) or "homework" (the course's GPU settings)
stage1_steps = None            # projector updates (None: the preset's; -1: one epoch)
stage2_steps = None            # fine-tune updates (None: the preset's; -1: one epoch)
quantization = "auto"          # stage 2 LLM: "auto" (4-bit when CUDA + bitsandbytes), "nf4" or "none"
vision_lora = True             # LoRA on the vision encoder too
system = ""                    # system prompt for the questions ("" : none)
pretrained_projector = None    # the course's LLaVA pretrain output (XTuner's iter_N.pth or its projector/ folder): skips stage 1

# %%
import pandas as pd
from IPython.display import Image, display

import helpers
from helpers.progress import quiet_libraries
from helpers.results import save_results
from helpers.vlm import answer_about_image, load_vlm, load_vlm_processor, prepare_vlm
from helpers.vlm_data import (CAPTIONS_FILE, CONVERSATIONS_FILE, PICTURE_FILE, draw_control_picture, make_llava_data,
                              preset_conversations, scripted_qa, validate_llava_data)
from helpers import vlm_train as vt
from helpers.fingerprint import current_sources
from helpers.generation import TIMINGS

quiet_libraries()
work = helpers.work(work_dir)
picture = image or PICTURE_FILE
conversations_file = preset_conversations(preset, conversations_file)
built = prepare_vlm(work, llm, vision_encoder)
vlm_repeats = vlm_repeats or vt.DATA_REPEATS[preset]
pd.Series(built, name="parts").to_frame()

# %% [markdown]
# ## The picture, and a control picture
# The kit draws its own picture (so nothing is downloaded): a house, a tree, the sun. The vision encoder
# sees it at its own resolution, cut into patches; each patch becomes one `<image>` position in the text.
# The second picture (a boat at night) is the **control**: the model never trains on it. We ask it the same
# questions before and after; a model that only learned to recite answers will recite them there too.

# %%
control = draw_control_picture(work.vlm_data / "control.png")
display(Image(filename=str(picture), width=200), Image(filename=str(control), width=200))

# %% [markdown]
# ## The data, in LLaVA format
# Each record names the picture and holds a conversation; `<image>` stands in the first human turn only.
# Stage 1 reads caption pairs, stage 2 the scripted conversations, each repeated `vlm_repeats` times: 20 on the
# tiny preset, 200 on `homework`, whose 6 conversations have 10 turns each as the course's (the tiny preset's have 3;
# give yours, e.g. about the course's `oph.jpg`, with `image` and `conversations_file`).
# Bad records are reported with one sentence (also: `python -m helpers validate-data --llava FILE`).

# %%
# NBVAL_CHECK_OUTPUT
files = make_llava_data(work.vlm_data, picture, conversations_file or CONVERSATIONS_FILE,
                        captions_file or CAPTIONS_FILE, repeats=vlm_repeats)
qa = scripted_qa(conversations_file or CONVERSATIONS_FILE)
questions, expected = list(qa), list(qa.values())
summary = {name: validate_llava_data(files[name]) for name in ("captions", "conversations")}
{name: {k: s[k] for k in ("records", "turns", "images")} for name, s in summary.items()}

# %% [markdown]
# ## The loss mask
# The picture's positions, the system prompt and the questions are context; only the assistant's answers
# (and the `<|im_end|>` that closes them) are trained on (green). One conversation as the model reads it; the
# run of image positions is shown once, with its count:

# %%
processor = load_vlm_processor(work.vlm_base_model)  # the tokenizer and image processor; no weights needed
vt.show_llava_loss_mask(processor, files["conversations"])

# %% [markdown]
# ## Stage 1: pre-align the projector
# The LLM and the vision encoder stay frozen; the projector learns to turn the picture's features into
# something the LLM can describe. On a real model this is the course's "pre-trained projector" step. (The
# tiny LLM has never written these words, so on the tiny preset its output layer learns along.) With
# `pretrained_projector` the course's own stage-1 output is loaded instead, and this stage is skipped as the course does.

# %%
if pretrained_projector:
    stage1 = vt.use_pretrained_projector(work, pretrained_projector, files["image"], ["请描述这张图片。"], system)
elif 1 in stages:
    config1 = vt.stage_config(1, preset, max_steps=stage1_steps, evaluation_inputs=["请描述这张图片。"], system=system)
    # the record only: the trained model is saved, and its memory is freed as the cell ends
    stage1 = vt.public_record(vt.train_stage(work, 1, work.vlm_base_model, files["captions"], files["image"], config1))
vt.evaluation_table(work, 1)

# %% [markdown]
# Before the fine-tune: the stage-1 model answers the scripted questions. It has never seen them; all it
# has learned about the picture is its caption, so that is what it says.

# %%
model1, processor1 = load_vlm(work.vlm_aligned_model)
stage1_answers = answer_about_image(model1, processor1, files["image"], questions, system)
control1 = answer_about_image(model1, processor1, control, questions, system)
del model1  # stage 2 loads its own copy (4-bit on a GPU): this one would only hold memory
vt.before_after_table(questions, expected, stage1_answers, control=(control1, None))

# %% [markdown]
# ## Stage 2: fine-tune (LoRA on the LLM and the vision encoder, projector trained)
# On a GPU with bitsandbytes the LLM is loaded in 4-bit NF4 (QLoRA); on a CPU the same recipe runs in 32-bit.
# The evaluation rounds below answer the scripted questions every few steps, so you can watch them arrive.

# %%
### BEGIN SOLUTION
stage2_changes = dict()  # stage 2 knobs you change, e.g. dict(lr=5e-3, lora_r=8); dict() keeps the preset's
### END SOLUTION
config2 = vt.stage_config(2, preset, max_steps=stage2_steps, quantization=quantization,
                          evaluation_inputs=questions, system=system, **stage2_changes)
{k: getattr(config2, k) for k in ("lr", "max_steps", "batch_size", "lora_r", "lora_alpha", "quantization")}

# %%
if 2 in stages:
    stage2 = vt.public_record(vt.train_stage(work, 2, work.vlm_aligned_model, files["conversations"], files["image"],
                                             config2, vision_lora=vision_lora))  # the adapter is saved; memory freed
    print({k: stage2[k] for k in ("quantization", "steps", "first_loss", "final_loss", "train_seconds")})
    print("trainable parameters:", stage2["parameters"])

# %%
vt.evaluation_table(work, 2)

# %% [markdown]
# ## Before and after
# The same questions about the same picture: the stage-1 model against the fine-tuned one; and about the
# control picture, which no stage trained on. If stage 2 answers the control picture with the house and the
# tree too, it learned to recite the answers rather than to look (the tiny model mostly does: it has seen one
# picture; a real LLaVA keeps describing what it sees).

# %%
model2, processor2 = vt.load_adapter_vlm(work)
stage2_answers = answer_about_image(model2, processor2, files["image"], questions, system)
control2 = answer_about_image(model2, processor2, control, questions, system)
table = vt.before_after_table(questions, expected, stage1_answers, stage2_answers, control=(control1, control2))
table

# %% [markdown]
# ## Save: adapter, projector, and a merged model
# `WORK/vlm/adapter` holds the LoRA layers and the trained projector; `WORK/vlm/aligned_model/projector.safetensors`
# the stage-1 projector. Merging folds the adapter into the weights: `WORK/vlm/final_model` is one plain
# LLaVA model that `AutoModelForImageTextToText` and `AutoProcessor` load.

# %%
final = vt.merge_vlm(work, (model2, processor2))  # the adapter model above, merged in place (not loaded again)
del model2
merged, merged_processor = load_vlm(final)
merged_answers = answer_about_image(merged, merged_processor, files["image"], questions, system)
print("merged model answers as the adapter did:", merged_answers == stage2_answers)

# %% [markdown]
# ## Chat about the picture
# The first question carries the picture; later ones continue the conversation. In a terminal:
# `python -m helpers chat WORK/vlm/final_model --image data/vlm_picture.png`.

# %%
from helpers.vlm_chat import VlmChat

chat = VlmChat(merged, merged_processor, files["image"], system)
for q in questions[:2]:
    print("用户 >>>", q)
    print("助手 >>>", chat.ask(q))

# %%
save_results(work, "05_vlm_llava_finetune", {
    "image": str(files["image"]), "source_image": str(picture), **built, "questions": questions,
    "expected_answers": expected, "stage1_answers": stage1_answers, "stage2_answers": stage2_answers,
    "merged_answers": merged_answers, "stage2_matches": table["stage 2 matches"].tolist(),
    "all_match": bool(table["stage 2 matches"].all()), "final_model": str(final),
    "before_after": table.to_dict(orient="records"),
    "stage1": vt.public_record(stage1) if 1 in stages else None,
    "stage2": vt.public_record(stage2) if 2 in stages else None, "control_image": str(control),
    "control_stage1_answers": control1, "control_stage2_answers": control2,
    "sources": current_sources(work, ("vlm_adapter", "vlm_final_model")),  # what these answers came from
    "answer_seconds": dict(TIMINGS)});

# %% [markdown]
# Next: **06 · Publish** — the model and a demo app, ready to share.
