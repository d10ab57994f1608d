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
# # 03 · Merge: adapter + base = one model
#
# Training left us a small **adapter** (`WORK/adapter`): for each linear layer two thin matrices `B·A`
# that are added to the frozen weight `W`. To chat with it we could load the base and put the adapter on
# top every time — or compute `W + B·A` once and save a plain model (`WORK/final_model`) that loads with
# `AutoModelForCausalLM` alone, runs as fast as the base, and can be published or served anywhere.
#
# **Why the base is loaded in 16/32-bit, not 4-bit.** QLoRA trained the adapter against a 4-bit copy of
# the base, but merging into 4-bit weights would have to round `W + B·A` back onto the coarse 4-bit grid:
# the small learned correction is mostly lost in that rounding. So we load the base in its own 16- or
# 32-bit dtype and merge there; the result is a normal full-precision model.

# %% [markdown]
# ## The course's steps, and where they are here
# | the course (camp2) | here |
# |---|---|
# | `xtuner chat /root/ft/model --adapter /root/ft/huggingface --prompt-template internlm2_chat` | **Before merging** (in a terminal: `python -m helpers chat WORK/model --adapter WORK/adapter --prompt-template internlm2_chat`) |
# | `mkdir -p /root/ft/final_model`; `export MKL_SERVICE_FORCE_INTEL=1`; `xtuner convert merge /root/ft/model /root/ft/huggingface /root/ft/final_model` | **Merge, verify, then replace** → `WORK/final_model` |
# | `ls /root/ft/final_model` | **Sizes on disk**, **Reload from disk and generate** |
#
# What differs, and why: the merge is checked before it replaces anything (tensors, config, chat template, weights and
# logits against base + adapter), because a merge that silently went wrong is only noticed much later, in a published
# model. The weights are written as `safetensors` rather than `pytorch_model-*.bin`. An adapter trained with XTuner comes in with `adapter_dir` (its
# `pth_to_hf` folder or the `iter_N.pth` itself).

# %% tags=["parameters"]
work_dir = None             # the run's work directory (None: ./work)
max_shard_size = "2GB"      # split the weights into safetensors files of at most this size
dtype = "auto"              # "auto" (the base's own dtype), "float32", "bfloat16" or "float16" — never 4-bit
overwrite = True            # replace an existing WORK/final_model once the new one is verified (False: stop instead)
tolerance = None            # max allowed |logit difference| after merging (None: 1e-3 for float32, 2 x rounding noise in 16 bits)
adapter_dir = None          # an XTuner adapter instead of notebook 02's: its pth_to_hf folder or iter_N.pth (becomes WORK/adapter)

# %%
import pandas as pd

import helpers
from helpers.base_model import base_model_path
from helpers.fingerprint import current_sources
from helpers.merge import dir_size, merge, verification_rows
from helpers.progress import quiet_libraries
from helpers.results import save_results
from helpers.xtuner import import_adapter

quiet_libraries()
work = helpers.work(work_dir)
base = base_model_path(work)
print("base model:", base, "\nadapter:   ", import_adapter(work, adapter_dir))

# %% [markdown]
# ## Before merging: chat with base + adapter
# The adapter works without merging: load the base and put the adapter on top (the course's
# `xtuner chat BASE --adapter ADAPTER`; here `python -m helpers chat WORK/model --adapter WORK/adapter`).
# Two turns of a conversation, with notebook 01's system prompt:

# %%
from helpers.chat import ChatSession, load_chat_model
from helpers.results import read_results

system = (read_results(work, "01_data_generation") or {}).get("system") or ""
unmerged = ChatSession(*load_chat_model(base, work.adapter), system=system)
before_merge = {q: unmerged.ask(q) for q in ["你是谁", "请你介绍一下你自己"]}
pd.Series(before_merge, name="base + adapter").to_frame()

# %% [markdown]
# ## Merge, verify, then replace
# `PeftModel.from_pretrained` puts the adapter on the base, `merge_and_unload()` folds `B·A` into `W` and
# drops the LoRA layers. The model is written to a staging folder beside `final_model` and checked there;
# only a model that passes replaces `final_model`. A merge that fails keeps the previous `final_model` and
# says what differs. The check judges the whole model, not only the tensors it holds:
#
# - the **tensors**: exactly those of base + adapter, with their shapes (none missing, none extra);
# - the **config**: every field of `config.json` and `generation_config.json` that changes what the model
#   computes, or where its answers stop (`<|im_end|>`), equals the base's;
# - the **chat template**: the merged tokenizer turns a chat into the same ids as the one used in training;
# - the **weights**: in a 16-bit model (the real 1.8B is bfloat16) every weight must be `W + B·A` rounded to
#   that dtype (at most one unit in the last place apart);
# - the **logits** on a few prompts: in float32 (the tiny model) within `tolerance` of base + adapter; in
#   16 bits within twice the rounding noise of that dtype of what a right merge computes.
#
# `final_model/verification.json` records the verdict with the hash of every file; notebooks 04 and 06,
# `helpers chat` and `helpers web` refuse a `final_model` without it, or whose files changed since.

# %%
result = merge(base, work.adapter, work.final_model, max_shard_size=max_shard_size, dtype=dtype,
               overwrite=overwrite, tolerance=tolerance)
check = result.verification
pd.Series(verification_rows(check), name="verified").to_frame()

# %%
# NBVAL_CHECK_OUTPUT
print("merge verified:", check["passed"])

# %% [markdown]
# ## Sizes on disk
# The adapter is small; the merged model is as big as the base (the LoRA matrices are folded in, not added).

# %%
sizes = pd.DataFrame({"MB": [dir_size(base) / 2**20, result.adapter_size_bytes / 2**20, result.size_bytes / 2**20]},
                     index=["base model", "adapter", "final_model"]).round(2)
sizes

# %% [markdown]
# ## Reload from disk and generate
# The proof that `final_model` stands alone: load it with plain transformers (no peft) and ask the
# identity question.

# %%
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.generation import generate_answers

final = AutoModelForCausalLM.from_pretrained(work.final_model).to("cuda" if torch.cuda.is_available() else "cpu")
final_tokenizer = AutoTokenizer.from_pretrained(work.final_model)
answers = generate_answers(final, final_tokenizer, ["你是谁", "请你介绍一下你自己"], system=system)
answers

# %%
save_results(work, "03_merge", {**result.as_dict(), "reload_answers": answers, "adapter_chat": before_merge,
                                "sources": current_sources(work, ("adapter", "final_model"))});

# %% [markdown]
# Next: **04 · Chat demo** puts the base and the merged model side by side, and lets you chat with it here,
# in a terminal (`python -m helpers chat WORK/final_model`) and in the browser (`python -m helpers web`).
