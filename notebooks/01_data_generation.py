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
# # 01 · Data: teach the assistant who it is
#
# Fine-tuning needs examples of the behaviour we want. Here that is one sentence — the assistant's
# identity — given in answer to "introduce yourself". We repeat it many times (the course uses 10,000),
# so that a few hundred training steps see it often.
#
# The file is written in XTuner's **conversation** format, a JSON list of
# `{"conversation": [{"system": ..., "input": ..., "output": ...}]}`; OpenAI's **messages** format is
# available too.

# %% [markdown]
# ## The course's steps, and where they are here
# | the course (camp2) | here |
# |---|---|
# | `mkdir -p /root/ft/data`; write `generate_data.py` (your name, `n = 10000`), run it → `/root/ft/data/personal_assistant.json` | the first code cell: `make_dataset(...)` with `name` and `repeats` (the course: 10000) → `WORK/data/personal_assistant.json` |
# | look at the file | **A look at the data**, **Tokens**, **The loss mask** |
#
# What differs, and why: the course's file holds OpenAI `messages` records, read by its config's `openai_map_fn`;
# `output_format = "messages"` writes exactly that, and the default, XTuner's `conversation` format, trains the same.
# The course asks one question 10,000 times and saw the model turn into a "复读机" that answers everything with its
# identity; it advised mixing in ordinary chat. Here that advice is built in: several phrasings of the question, and a
# share of general chat (`general_ratio`); notebook 04 shows the over-fitted run beside it.

# %% tags=["parameters"]
work_dir = None                                    # the run's work directory (None: ./work)
### BEGIN SOLUTION
name = "小明"                                      # whose assistant it is: "我是{name}的小助手"
answer_template = "我是{name}的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦"  # {name} is filled in
### END SOLUTION
questions = ["请做一下自我介绍", "介绍一下你自己", "你是谁呀", "你叫什么名字", "你是我的助手吗", "Who are you?"]  # asked in turn
repeats = 2000                                     # identity records (the course: 10000)
general_ratio = 0.2                                # share of general chat mixed in against over-fitting (0: none)
### BEGIN SOLUTION
evaluation_inputs = ["请你介绍一下你自己", "你是谁", "你是我的小助手吗"]  # asked during training (not in the data)
### END SOLUTION
system = ""                                        # system prompt for every record ("" : none)
output_format = "conversation"                     # "conversation" (XTuner) or "messages" (OpenAI)

# %%
import json

import pandas as pd

import helpers
from helpers.base_model import base_model_path
from helpers.data import load_dataset, make_dataset, show_loss_mask, token_length_stats, trained_text, validate_data
from helpers.results import save_results

work = helpers.work(work_dir)
path = make_dataset(work.dataset, name=name, answer_template=answer_template, repeats=repeats,
                    questions=questions, system=system, general_ratio=general_ratio, output_format=output_format)
summary = validate_data(path)
summary

# %% [markdown]
# ## A look at the data
# The first records, as the trainer will read them. With `general_ratio > 0` some records are ordinary
# questions with ordinary answers: they keep the model from answering *every* question with its identity
# (the over-fitting the course saw).

# %%
conversations = load_dataset(path)
pd.DataFrame([{m["role"]: m["content"] for m in c} for c in conversations[:8]])

# %% [markdown]
# ## Tokens
# The model sees tokens, not characters. Each record is rendered with the model's **chat template** and
# tokenized; the lengths decide how many records fit in one packed training sequence.

# %%
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(base_model_path(work))
stats = token_length_stats(tokenizer, conversations)
counted = int(stats["count"])
print(f"token lengths of {counted:,} of the {len(conversations):,} records"
      + (f" (a sample: the first {counted:,}, enough for the statistics)" if counted < len(conversations) else ""))
stats.to_frame().T

# %% [markdown]
# ## The loss mask: what the model is trained on
# Only the assistant's answer (and the `<|im_end|>` that ends it) is trained on; the system prompt and the
# question are context. Below, one record exactly as the model reads it, special tokens included: the
# green text is what it is trained to say (the loss mask), the grey text is context.

# %%
identity = next(c for c in conversations if name in c[-1]["content"])
show_loss_mask(tokenizer, identity)

# %%
# NBVAL_CHECK_OUTPUT
print("trained on:", trained_text(tokenizer, [{"role": "user", "content": "请做一下自我介绍"},
                                              {"role": "assistant", "content": "我是小明的小助手"}]))

# %%
identity_records = sum(name in c[-1]["content"] for c in conversations)
save_results(work, "01_data_generation", {
    **summary, "name": name, "answer": answer_template.format(name=name), "answer_template": answer_template,
    "identity_records": identity_records,
    "general_records": summary["records"] - identity_records, "questions": questions,
    "evaluation_inputs": evaluation_inputs, "system": system,
    "token_length": {k: float(v) for k, v in stats.items()}});

# %% [markdown]
# Next: **02 · QLoRA fine-tune** trains an adapter on this file and watches the identity arrive.
