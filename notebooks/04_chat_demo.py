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

# %% [markdown]
# ## The course's steps, and where they are here
# | the course (camp2) | here |
# |---|---|
# | `xtuner chat /root/ft/model --prompt-template internlm2_chat` (the base model, to compare) | the `before` column of **The before/after table** |
# | `xtuner chat /root/ft/final_model --prompt-template internlm2_chat` (type, Enter twice; `RESET`, `EXIT`) | **Chat in a terminal**: `python -m helpers chat WORK/final_model --prompt-template internlm2_chat`, run here once with typed lines; **Chat in the notebook** |
# | seeing the "复读机" by hand (the iter_600 answers) | **Over-fitting check**, next to an adapter **over-fitted on purpose** |
# | `pip install streamlit==1.24.0`; `git clone https://github.com/InternLM/InternLM.git` into `/root/ft/web_demo`; edit `chat/web_demo.py` to `/root/ft/final_model`; `streamlit run /root/ft/web_demo/InternLM/chat/web_demo.py --server.address 127.0.0.1 --server.port 6006`; `ssh -CNg -L 6006:127.0.0.1:6006 root@ssh.intern-ai.org.cn -p PORT` | **Chat in the browser**: `python -m helpers web WORK/final_model --port 6006` (the same ssh tunnel) |
#
# What differs, and why: the chat template is the tokenizer's own, so `--prompt-template` is only checked, never needed;
# one Enter sends a line. Answers are greedy by default (the course's web demo samples with temperature 0.1, top-p 0.75),
# so the before/after table is the same on every run. The web demo is the kit's own page (`helpers/web_app.py`): nothing to
# clone or edit. The transcripts of this notebook's chats go to `WORK/results/04_chat_demo.json` and into the report.

# %% tags=["parameters"]
work_dir = None            # the run's work directory (None: ./work)
general_count = 10         # how many held-out general questions (data/general_heldout.json) go into the table
max_new_tokens = 64        # answer length in the before/after table (greedy decoding)
system = None              # system prompt for the table and the chat (None: notebook 01's, as in training)
chat_max_new_tokens = 128  # the chat widget's starting settings (adjustable with its sliders)
temperature = 0.0          # 0: greedy; > 0 samples
top_p = 1.0                # nucleus sampling share, used when temperature > 0
demo_messages = ["你是谁", "推荐一本书吧"]  # typed into the widget, the terminal chat and the web demo in headless runs
contrast = True            # also train the over-fitted contrast adapter (identity only, no general chat; seconds on tiny)
contrast_repeats = None    # identity records in the contrast data (None: twice notebook 01's)
contrast_steps = None      # its updates (None: the preset's, as notebook 02)
allow_unverified = False   # chat with a final_model whose merge check (notebook 03) is missing or out of date
adapter_dir = None         # the XTuner adapter notebook 03 merged, if any: its pth_to_hf folder or iter_N.pth (None: notebook 02's)
evaluation_tasks = ["course_mc"]  # lm-eval tasks for "what the fine-tune cost" (a subset such as "ceval-valid_computer_network" needs the network once)
evaluation_limit = None    # questions per task (None: all)

# %%
import pandas as pd

import helpers
from helpers.base_model import base_model_path
from helpers.chat import before_after, general_questions, load_course_models, overfitting_check
from helpers.fingerprint import current_sources
from helpers.merge import require_verified
from helpers.xtuner import import_adapter
from helpers.progress import quiet_libraries
from helpers.results import load_results, save_results

quiet_libraries()
pd.set_option("display.max_colwidth", 80)
work = helpers.work(work_dir)
import_adapter(work, adapter_dir)  # an XTuner adapter given here is WORK/adapter, as in notebook 03
data_results = load_results(work, "01_data_generation")
identity, evaluation_inputs = data_results["answer"], data_results["evaluation_inputs"]
system = data_results.get("system", "") if system is None else system
print("expected identity:", identity, "\nsystem prompt:", repr(system))
print(require_verified(work.final_model, allow_unverified, adapter=work.adapter)
      or "final_model: verified by notebook 03 (its files and the adapter unchanged since)")

# %% [markdown]
# ## A contrast: the over-fitted adapter
# The course's first runs showed what training on one sentence thousands of times does: the model answers
# *every* question with it (a "复读机", a repeating machine). Notebook 01 mixed general chat in to prevent that.
# To see that the check below can tell the two apart, we train that failure on purpose: the identity alone
# (`general_ratio = 0`, twice as many identity records), the same recipe as notebook 02, into `WORK/contrast`.
# (The tiny preset's 150 updates read about a thousand packed records, so it is the missing general chat, not
# the count, that makes the difference here; on a real run with `epochs`, more repeats are more updates too.)

# %%
from helpers.contrast import loss_comparison, overfitted_run
from helpers.results import read_results

overfitted = None
if contrast:
    overfitted = overfitted_run(work, data_results["name"], data_results["answer_template"],
                                data_results["questions"], system, max_steps=contrast_steps,
                                repeats=contrast_repeats or 2 * data_results["identity_records"],
                                preset=(read_results(work, "02_qlora_finetune") or {}).get("preset", "tiny"))
    print(f"contrast: {overfitted['steps']} updates on identity-only data, loss {overfitted['final_loss']:.3f}")
    display(loss_comparison(work))

# %% [markdown]
# ## The before/after table
# Greedy decoding, the same chat template and stop tokens for every model, so every difference comes from
# the fine-tune. The **general** questions are held out: they are in no training data (not in notebook 01's
# mix, not in the tiny model's pre-training), so what the models say there is what they generalise to.
# `after` is the mixed run (`final_model`), `over-fitted` the contrast; `reference` is a correct answer.
#
# Each model is loaded once for the whole notebook: the base model with both adapters on top (notebook 02's and the
# contrast's, switched by name; peft's `disable_adapter()` turns them off for the base itself) and `final_model`.
# Each column's questions are answered together in one batch (left padding, so every question keeps its own
# positions). In float32, as on the CPU, every answer is token for token the one a single question gets; in bf16 on a
# GPU a padded row's sums can round differently and, rarely, turn a near tie to another token.

# %%
models = load_course_models(base_model_path(work), work.final_model,
                            {"adapter": work.adapter, "over-fitted": work.contrast / "adapter" if overfitted else None})
table = before_after(base_model_path(work), work.final_model, evaluation_inputs, general_questions(general_count),
                     system=system, max_new_tokens=max_new_tokens,
                     overfitted_adapter=work.contrast / "adapter" if overfitted else None, models=models)
table

# %% [markdown]
# ## Over-fitting check
# On the held-out general questions the identity should not appear. An answer counts as leaking when it
# repeats the identity, or a run of 6 of its characters; if more than half leak, the model is over-fitted:
# train fewer steps, lower the learning rate, or mix in general data (`general_ratio` in notebook 01).

# %%
verdict = overfitting_check(table, identity)
verdicts = {"mixed run (final_model)": verdict}
if overfitted:
    verdicts["over-fitted contrast"] = overfitting_check(table, identity, column="over-fitted")
pd.DataFrame(verdicts)

# %%
for label, v in verdicts.items():
    print(f"{label}: {'OVER-FITTED' if v['overfitted'] else 'not over-fitted'} - identity in "
          f"{v['identity_on_evaluation']}/{v['evaluation_questions']} evaluation answers, "
          f"{v['identity_on_general']}/{v['general_questions']} held-out general answers")

# %%
from helpers.generation import TIMINGS

save_results(work, "04_chat_demo", {"identity": identity, "system": system, "max_new_tokens": max_new_tokens,
                                    "answer_seconds": dict(TIMINGS),  # the GPU benchmark splits the time with it
                                    "rows": table.to_dict(orient="records"), **verdict,
                                    "contrast": verdicts.get("over-fitted contrast"),
                                    "sources": current_sources(work, ("adapter", "final_model"))});

# %% [markdown]
# On the tiny model the check tells the two runs apart: the contrast repeats its identity on (nearly) every
# held-out question and is flagged; the mixed run keeps it for the questions about itself and passes. Read the
# mixed run's general answers too: they are rarely *right* (a model of a few hundred thousand parameters
# pre-trained on ~180 chat pairs has no knowledge to draw on, so it answers an unseen question with pieces of
# answers it learned), but they are general answers, not the identity. That is what the general chat in
# notebook 01's mix protects; the contrast, trained without it, has forgotten every other answer.

# %% [markdown]
# ## What the fine-tune cost
# The check above counts leaks; this is the table the camp's next lessons (OpenCompass, LLaMA-Factory) measure, for
# the base model, base + adapter and the merged `final_model` (`delta` = final_model − base):
# - **general ability**: multiple-choice accuracy through `lm-eval`, on the kit's own 40 bilingual questions
#   (`data/course_mc`, offline); put a C-Eval / CMMLU / MMLU subset in `evaluation_tasks` where the machine can
#   download it;
# - **held-out chat loss**: the loss on general chat no training data holds (lower is better);
# - **identity**: the share of five unseen paraphrases of "who are you" answered with the name, and the share of
#   held-out general questions the identity leaks into ("it answers everything with its identity").
#
# The same table from a terminal: `python -m helpers evaluate work` (`--tasks`, `--limit`).

# %%
from helpers.evaluate import cost_table, fine_tune_cost

cost = fine_tune_cost(work, evaluation_tasks, evaluation_limit, allow_unverified, models=models)
models.free("base")  # the chats below need final_model alone
cost_table(cost)

# %% [markdown]
# On the tiny model the identity rows move from none to all of the paraphrases, and base + adapter and `final_model`
# agree (the merge changed nothing). Its accuracy moves by a question or so (one of 40 is 0.025): a model that knows
# little has little to lose, and its held-out chat loss even falls, as notebook 01 mixed general chat in. On a real
# model the accuracy row is the one to watch: a drop of more than a few points is what the fine-tune cost in general
# ability (fewer repeats, a lower learning rate, or more general chat in the mix).

# %% [markdown]
# ## Chat in the notebook
# Type a message and press Enter (or **Send**). The answer streams in token by token; earlier turns are
# kept and sent along (multi-turn history); **Reset** starts over. The sliders set the answer length,
# the temperature (0 = greedy) and top-p. In a headless run nobody types, so the cell after the widget
# sends `demo_messages` through it, the same way the Send button does, each as a conversation of its own (Reset
# before it: see below why).

# %%
from helpers.chat import GenerationSettings, chat_widget

model, tokenizer = models.final, models.tokenizers["final_model"]  # loaded once, above
widget = chat_widget(model, tokenizer, system, GenerationSettings(chat_max_new_tokens, temperature, top_p))
widget

# %%
demo = []
for message in demo_messages:
    widget.reset()
    demo += [{"role": "user", "content": message}, {"role": "assistant", "content": widget.ask(message)}]
pd.DataFrame(demo)

# %% [markdown]
# Why a Reset before each message: the tiny model was only ever trained on one question and one answer at a time,
# so with an earlier turn in its context it often answers with a broken piece of that turn instead of the new
# question (try it: type a second message without Reset). A real chat model was trained on long conversations and
# follows them. The chat keeps the newest turns that fit the model's context (`max_position_embeddings` positions,
# with room for the answer) and says so when it leaves older ones out.

# %% [markdown]
# ## Chat in the browser: the web demo
# The same model in a Streamlit page (`helpers/web_app.py`, one self-contained file): a chat with streaming
# and history, and a sidebar with the generation settings and the system prompt. Notebook 06 publishes it.
# Here it runs headless (streamlit's `AppTest`: the page's script, without a browser); we type the first demo
# message into its chat box and read the page back:

# %%
from helpers.chat import web_demo_transcript

web = web_demo_transcript(work.final_model, demo_messages[:1], system=system)
web

# %% [markdown]
# ## Chat in a terminal
# The course's `xtuner chat /root/ft/final_model --prompt-template internlm2_chat` is, here,
# `python -m helpers chat WORK/final_model --prompt-template internlm2_chat` (the template is the one in the model's
# tokenizer; the option is checked against it, and may be left out). A notebook cannot type into a terminal, so this
# cell runs the command once with `demo_messages` typed in, `RESET` between them, then `EXIT`, and shows what the
# terminal showed:

# %%
from helpers.terminal import terminal_transcript

typed = [line for message in demo_messages for line in ("RESET", message)][1:]
terminal = terminal_transcript(work.final_model, typed, "--prompt-template", "internlm2_chat", "--max-new-tokens",
                               chat_max_new_tokens, *(["--unverified"] if allow_unverified else []))
print(terminal)

# %%
save_results(work, "04_chat_demo", {**load_results(work, "04_chat_demo"), "chat_transcript": demo,
                                    "web_transcript": web.to_dict(orient="records"), "terminal_transcript": terminal});

# %% [markdown]
# To open it in your browser, run in a terminal (from the kit's folder), then open http://localhost:8501:
#
# ```bash
# python -m helpers web work/final_model --port 8501
# ```
#
# And in a terminal, as the course's `xtuner chat`:
#
# ```bash
# python -m helpers chat work/final_model --prompt-template internlm2_chat  # streams; RESET clears the history, EXIT quits
# python -m helpers chat work/model --adapter work/adapter  # base + adapter, before merging (notebook 03)
# ```
#
# Next: **05 · VLM** does the same for a model that sees images.
