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
# # 00 · The environment
#
# Before fine-tuning anything we check what this machine can do: which library versions are here,
# whether there is a GPU, and whether **4-bit QLoRA** (which needs CUDA and `bitsandbytes`) can run.
# Then we prepare the **base model** every later notebook starts from.
#
# Every notebook reads and writes only inside one **work directory** (`work_dir`), so a teacher can run
# the whole course for many students side by side.

# %% [markdown]
# ## The course's steps, and where they are here
# | the course (camp2: XTuner fine-tune of a personal assistant) | here |
# |---|---|
# | `studio-conda xtuner0.1.17`, `conda activate xtuner0.1.17`; `git clone -b v0.1.17 https://github.com/InternLM/xtuner`, `pip install -e '.[all]'` | `make venv` (or `conda env create -f environment.yml`); the **environment** and **pre-flight** tables below |
# | `mkdir -p /root/ft/model`; `cp -r /root/share/new_models/Shanghai_AI_Laboratory/internlm2-chat-1_8b/* /root/ft/model/` | **The base model** cell: `base_model = "/root/ft/model"` (or `-p base_model /root/ft/model`) |
#
# What differs, and why: there is no XTuner to install, because the kit trains with transformers + peft (+ bitsandbytes for
# 4-bit) directly. The InternLM2 checkpoint ships its own modelling code, which current transformers cannot run, so it is
# converted once into `WORK/model/converted` (the same weights in the Llama layout, the same tokenizer ids). By default
# (`base_model = "tiny"`) a tiny model is built here instead, so the course runs on a CPU in minutes.

# %% tags=["parameters"]
work_dir = None        # where this run's files go (None: ./work next to the notebooks)
base_model = "tiny"    # "tiny" (built offline, runs on a CPU), a local model folder, or a hub id (needs network)
seed = 0               # the tiny model is built from this seed, so every run gets the same model

# %%
import helpers
from helpers.base_model import base_model_source, prepare_base_model
from helpers.environment import environment, environment_table
from helpers.results import save_results

work = helpers.work(work_dir)
facts = environment(work.root)
environment_table(facts)

# %% [markdown]
# **What the table says.** `qlora_4bit` tells whether the model can be loaded in 4-bit here. Without a GPU
# the kit trains ordinary (16/32-bit) LoRA adapters instead; the recipe is otherwise the same.
# The recommendation below picks the preset that fits this machine.

# %%
print(f"recommended preset: {facts['recommended_preset']}\n{facts['recommendation']}")

# %% [markdown]
# ## Pre-flight: what the later notebooks need from this machine
# Besides Python packages, the course uses a few tools of the machine itself. A ✗ says how to fix it and which
# notebooks it affects (`make run` installs git, git-lfs and the font itself where it can).

# %%
from helpers.environment import preflight, preflight_table

facts["preflight"] = preflight()
preflight_table(facts["preflight"])

# %% [markdown]
# ## The base model
#
# With `base_model = "tiny"` the kit builds its own small chat model (a 2-layer Llama with a byte-level BPE
# tokenizer trained on the kit's text). It was pre-trained for a few hundred steps on a small bilingual chat
# set, so it already answers like a generic assistant — and it does **not** know whose assistant it is yet.
# With a real model (for example a local copy of `internlm2-chat-1.8b`), the folder is checked and recorded.
# Either way the model is recorded **by content**: a hash of its config, tokenizer and weight files, which every
# later step compares (a base model changed in place, say rebuilt with another seed, is another base model).

# %%
from helpers.base_model import base_model_identity, identity_table

model_path = prepare_base_model(base_model, work, seed=seed)
identity = base_model_identity(work)
identity_table(identity)

# %% [markdown]
# The chat template decides how a conversation becomes text. The course's model uses the InternLM2 layout:
# every turn is `<|im_start|>role\ncontent<|im_end|>\n`, and generation stops at `<|im_end|>`.
# Training and chatting both use this one template, so they can never disagree.

# %%
# NBVAL_CHECK_OUTPUT
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(model_path)
print(tokenizer.apply_chat_template(
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "你好"}],
    tokenize=False, add_generation_prompt=True))

# %%
save_results(work, "00_environment", {**facts, "base_model": base_model_source(work), "loaded_from": str(model_path),
                                       "base_model_identity": identity});

# %% [markdown]
# Next: **01 · Data generation** writes the data that teaches the model who it is.
