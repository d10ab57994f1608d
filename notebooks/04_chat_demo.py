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
# # 04 · Chat demo: before and after
#
# Did the fine-tune do what we wanted — and only that? We ask the **base model** and the merged
# **final_model** the same questions: the evaluation inputs (which should now get the new identity) and
# ordinary questions (which should *not*). Then we chat with the model: here in the notebook, in a
# terminal, and in the browser.

# %% tags=["parameters"]
work_dir = None            # the run's work directory (None: ./work)
general_count = 10         # how many general questions from data/general_chat.json go into the table
max_new_tokens = 64        # answer length in the before/after table (greedy decoding)
system = ""                # system prompt for the table and the chat ("": none, as in training)
chat_max_new_tokens = 128  # the chat widget's starting settings (adjustable with its sliders)
temperature = 0.0          # 0: greedy; > 0 samples
top_p = 1.0                # nucleus sampling share, used when temperature > 0
demo_messages = ["你是谁", "你好"]  # sent through the widget in headless runs, to show a conversation

# %%
import pandas as pd

import helpers
from helpers.base_model import base_model_path
from helpers.chat import before_after, general_questions, overfitting_check
from helpers.progress import quiet_libraries
from helpers.results import load_results, save_results

quiet_libraries()
pd.set_option("display.max_colwidth", 80)
work = helpers.work(work_dir)
data_results = load_results(work, "01_data_generation")
identity, evaluation_inputs = data_results["answer"], data_results["evaluation_inputs"]
print("expected identity:", identity)

# %% [markdown]
# ## The before/after table
# Greedy decoding, the same chat template and stop tokens for both models, so every difference comes
# from the fine-tune. `reference` is the answer the general-chat set gives, for comparison.

# %%
table = before_after(base_model_path(work), work.final_model, evaluation_inputs, general_questions(general_count),
                     system=system, max_new_tokens=max_new_tokens)
table

# %% [markdown]
# ## Over-fitting check
# A model that saw one answer thousands of times may give it to *every* question. On the general questions
# the identity should not appear; if it does in more than half of them, the model is over-fitted: train
# fewer steps, lower the learning rate, or mix in general data (`general_ratio` in notebook 01).

# %%
verdict = overfitting_check(table, identity)
pd.Series(verdict).to_frame("value")

# %%
print("over-fitted" if verdict["overfitted"] else "not over-fitted",
      f"- identity in {verdict['identity_on_evaluation']}/{verdict['evaluation_questions']} evaluation answers,"
      f" {verdict['identity_on_general']}/{verdict['general_questions']} general answers")

# %%
save_results(work, "04_chat_demo", {"identity": identity, "system": system, "max_new_tokens": max_new_tokens,
                                    "rows": table.to_dict(orient="records"), **verdict});

# %% [markdown]
# ## Chat in the notebook
# Type a message and press Enter (or **Send**). The answer streams in token by token; earlier turns are
# kept and sent along (multi-turn history); **Reset** starts over. The sliders set the answer length,
# the temperature (0 = greedy) and top-p. In a headless run nobody types, so the cell after the widget
# sends `demo_messages` through it, the same way the Send button does.

# %%
from helpers.chat import GenerationSettings, chat_widget, load_chat_model

model, tokenizer = load_chat_model(work.final_model)
widget = chat_widget(model, tokenizer, system, GenerationSettings(chat_max_new_tokens, temperature, top_p))
widget

# %%
for message in demo_messages:
    widget.ask(message)
pd.DataFrame(widget.session.history)

# %% [markdown]
# ## Chat in a terminal and in the browser
# The same model, outside the notebook (run these in a terminal, from the kit's folder):
#
# ```bash
# python -m helpers chat work/final_model                  # streams; RESET clears the history, EXIT quits
# python -m helpers chat work/model --adapter work/adapter  # base + adapter, before merging
# python -m helpers web work/final_model --port 8501        # then open http://localhost:8501
# ```
#
# The web demo is a Streamlit app (`helpers/web_app.py`, one self-contained file): a chat with streaming and
# history, and a sidebar with the generation settings and the system prompt. Notebook 06 publishes it.
#
# Next: **05 · VLM** does the same for a model that sees images.
