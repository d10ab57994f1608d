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

# %% tags=["parameters"]
work_dir = None             # the run's work directory (None: ./work)
max_shard_size = "2GB"      # split the weights into safetensors files of at most this size
dtype = "auto"              # "auto" (the base's own dtype), "float32", "bfloat16" or "float16" — never 4-bit
overwrite = True            # replace an existing WORK/final_model (False: stop instead)
tolerance = None            # max allowed |logit difference| after merging (None: 1e-3 for float32; 16-bit: weights checked)

# %%
import pandas as pd

import helpers
from helpers.base_model import base_model_path
from helpers.merge import TOLERANCE, dir_size, merge, verify_merge
from helpers.progress import quiet_libraries
from helpers.results import save_results

quiet_libraries()
work = helpers.work(work_dir)
base = base_model_path(work)
print("base model:", base, "\nadapter:   ", work.adapter)

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
# ## Merge
# `PeftModel.from_pretrained` puts the adapter on the base, `merge_and_unload()` folds `B·A` into `W` and
# drops the LoRA layers. The model is written to a temporary folder and renamed into place only when it is
# complete, so an interrupted merge never leaves a half-written `final_model`. The tokenizer, its chat
# template and a `generation_config.json` that stops at `<|im_end|>` are saved with it.

# %%
result = merge(base, work.adapter, work.final_model, max_shard_size=max_shard_size, dtype=dtype,
               overwrite=overwrite)
pd.Series(result.files, name="files in final_model").to_frame()

# %% [markdown]
# ## Verify: the merged model computes what base + adapter computed
# Same prompts through both: base + adapter, unmerged and computed in float32, and the merged model reloaded
# from disk. In float32 (the tiny model) the logits agree up to rounding (`tolerance`). A 16-bit model (the
# real 1.8B is bfloat16) must round `W + B·A` when it is stored, and a small update partly rounds away, so
# there every weight is checked instead: it must be `W + B·A` rounded to that dtype (at most one unit in the
# last place apart), and we print how much of the adapter's change was too small to survive. For scale: how
# much the adapter changes the base's logits; a merge that silently lost the adapter would differ by that much.

# %%
check = verify_merge(work.final_model, base, work.adapter, tolerance=tolerance)
print(f"max |logits(final_model) - logits(base + adapter)| = {check['max_abs_diff']:.2e}"
      + (f" (tolerance {check['tolerance']:.2g})" if check["tolerance"] is not None else ""))
if check["weights"]:
    w = check["weights"]
    print(f"every weight is W + B·A rounded to {check['dtype']}: at most {w['max_ulps']:.0f} unit(s) in the last "
          f"place apart; {w['rounded_away']:.1%} of the adapter's changes were below {check['dtype']}'s resolution")
print(f"the adapter itself moves the logits by up to {check['adapter_effect_max_abs']:.3f}")
assert check["passed"], "the merged model does not reproduce base + adapter; do not use this final_model"

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
save_results(work, "03_merge", {**result.as_dict(), **check, "reload_answers": answers,
                                "adapter_chat": before_merge});

# %% [markdown]
# Next: **04 · Chat demo** puts the base and the merged model side by side, and lets you chat with it here,
# in a terminal (`python -m helpers chat WORK/final_model`) and in the browser (`python -m helpers web`).
