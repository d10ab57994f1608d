"""Chatting: streaming, history, the before/after table, the notebook widget, and the terminal chat via stdin."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from test_merge import make_adapter

IDENTITY = "我是小明的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦"
BASE_IDENTITY = "我是一个AI助手，可以回答你的问题。"


@pytest.fixture(scope="module")
def adapter_and_final(tiny_model_dir, tmp_path_factory):
    from helpers.merge import merge

    root = tmp_path_factory.mktemp("chat")
    adapter = make_adapter(tiny_model_dir, root / "adapter", seed=1, scale=0.08)
    return adapter, merge(tiny_model_dir, adapter, root / "final_model").final_model


@pytest.fixture(scope="module")
def final_chat(adapter_and_final):
    from helpers.chat import load_chat_model

    return load_chat_model(adapter_and_final[1])


def run_chat_cli(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "helpers", "chat", *map(str, args)], input=stdin, text=True,
                          capture_output=True, env=env, timeout=600, encoding="utf-8")


def test_reply_streams_in_pieces_and_equals_greedy_answer(final_chat):
    from helpers.chat import stream_reply
    from helpers.generation import build_messages, generate_answers

    model, tokenizer = final_chat
    pieces = list(stream_reply(model, tokenizer, build_messages("你是谁")))
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces).strip() == generate_answers(model, tokenizer, ["你是谁"], max_new_tokens=256)[0]


def test_session_sends_the_history_and_reset_forgets_it(final_chat):
    import torch

    from helpers.chat import ChatSession

    model, tokenizer = final_chat
    session = ChatSession(model, tokenizer)
    first = session.ask("你是谁")
    second = session.ask("你好")
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2 and session.history[1]["content"] == first
    # the second answer is the greedy continuation of the whole conversation, not of "你好" alone
    messages = session.history[:3]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=256, do_sample=False, eos_token_id=model.generation_config.eos_token_id)
    assert second == tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    session.reset()
    assert session.history == []


def test_sampling_settings_are_used(final_chat):
    import torch

    from helpers.chat import ChatSession, GenerationSettings

    model, tokenizer = final_chat
    answers = set()
    for seed in range(4):
        torch.manual_seed(seed)
        answers.add(ChatSession(model, tokenizer, settings=GenerationSettings(40, 1.5, 1.0)).ask("Hello!"))
    assert len(answers) > 1  # temperature 1.5 samples; greedy would give one answer
    short = ChatSession(model, tokenizer, settings=GenerationSettings(max_new_tokens=2)).ask("Tell me a joke.")
    assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= 2


def test_notebook_widget_chats_and_resets(final_chat):
    from helpers.chat import chat_widget

    model, tokenizer = final_chat
    widget = chat_widget(model, tokenizer)
    widget.text.value = "你是谁"  # pressing Enter in the text box sends it
    answer = widget.session.history[-1]["content"]
    assert answer and answer in widget.transcript.value and "你是谁" in widget.transcript.value
    assert widget.text.value == ""  # the box is cleared for the next message
    widget.max_new_tokens.value = 8
    widget.ask("你好")
    assert len(widget.session.history) == 4 and widget.session.settings.max_new_tokens == 8
    widget.reset_button.click()
    assert widget.session.history == [] and "no messages yet" in widget.transcript.value


def test_cli_streams_keeps_history_resets_and_exits(course_work):
    result = run_chat_cli([course_work.final_model], "你是谁\n你好\nRESET\n请你介绍一下你自己\nEXIT\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count(IDENTITY) >= 2, out
    assert "(history cleared: 2 turns forgotten)" in out and out.rstrip().endswith("bye")


def test_cli_with_adapter_answers_like_the_merged_model(tiny_model_dir, adapter_and_final, final_chat):
    from helpers.chat import ChatSession, GenerationSettings

    adapter, _ = adapter_and_final
    result = run_chat_cli([tiny_model_dir, "--adapter", adapter, "--max-new-tokens", "32"], "你是谁\n")
    assert result.returncode == 0, result.stderr
    expected = ChatSession(*final_chat, settings=GenerationSettings(32)).ask("你是谁")
    assert f"助手 >>> {expected}\n" in result.stdout


def test_cli_bad_input_is_one_sentence(tmp_path, tiny_model_dir):
    result = run_chat_cli([tmp_path / "nowhere"], "")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "no such directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "adapter").mkdir()
    result = run_chat_cli([tiny_model_dir, "--adapter", tmp_path / "adapter"], "")
    assert result.returncode == 2 and "has no adapter_config.json" in result.stderr


def test_image_option_hands_over_to_the_vlm_chat(monkeypatch, tmp_path):
    from helpers.__main__ import main

    calls = []
    fake = types.ModuleType("helpers.vlm_chat")
    fake.run_cli = lambda *args, **kwargs: calls.append((args, kwargs)) or 0
    monkeypatch.setitem(sys.modules, "helpers.vlm_chat", fake)
    monkeypatch.setattr(sys.modules["helpers"], "vlm_chat", fake, raising=False)
    assert main(["chat", str(tmp_path), "--image", "cat.png", "--system", "be brief", "--max-new-tokens", "40"]) == 0
    assert calls == [((str(tmp_path), "cat.png", "be brief"), {"max_new_tokens": 40})]


def test_before_after_table_shows_the_fine_tune(course_work):
    from helpers.chat import general_questions
    from helpers.results import load_results

    results = load_results(course_work, "04_chat_demo")
    rows = results["rows"]
    evaluation = [r for r in rows if r["kind"] == "evaluation"]
    assert [r["question"] for r in evaluation] == ["请你介绍一下你自己", "你是谁", "你是我的小助手吗"]
    for row in evaluation:
        assert row["before"] != row["after"]
        assert IDENTITY in row["after"] and IDENTITY not in row["before"]
    assert any(BASE_IDENTITY in r["before"] for r in evaluation)
    assert [r["question"] for r in rows if r["kind"] == "general"] == [g["input"] for g in general_questions(10)]
    assert results["identity_on_evaluation"] == 3
    # The check tells the two runs apart: the mixed run passes it, the over-fitted contrast beside it is flagged.
    assert results["overfitted"] is False and results["identity_on_general"] <= 3, rows
    assert results["contrast"]["overfitted"] is True and results["contrast"]["identity_on_general"] >= 8, rows


def test_held_out_questions_are_in_no_training_data(course_work):
    from helpers.chat import general_questions
    from helpers.data import general_chat_samples, load_dataset
    from helpers.tiny_model import _pretraining_conversations

    held_out = {g["input"] for g in general_questions()}
    assert len(held_out) == 10
    seen = {r["conversation"][0]["input"] for r in general_chat_samples()}
    seen |= {m["content"] for c in _pretraining_conversations() for m in c}
    seen |= {m["content"] for c in load_dataset(course_work.dataset) for m in c}
    assert not held_out & seen
    assert not {g["output"] for g in general_questions()} & seen  # nor their reference answers


def test_overfitting_check_flags_the_overfitted_adapter_and_passes_the_mixed_one(course_work):
    """Recomputed here: the held-out questions, asked of base + the contrast adapter and of final_model."""
    from helpers.chat import before_after, general_questions, overfitting_check

    table = before_after(course_work.model, course_work.final_model, ["你是谁"], general_questions(),
                         max_new_tokens=32, overfitted_adapter=course_work.contrast / "adapter")
    mixed, overfitted = overfitting_check(table, IDENTITY), overfitting_check(table, IDENTITY, column="over-fitted")
    assert overfitted["overfitted"] is True and overfitted["identity_on_general"] >= 8, table
    assert mixed["overfitted"] is False and mixed["identity_on_general"] <= 3, table


def test_overfitting_check_flags_identity_everywhere():
    import pandas as pd

    from helpers.chat import leaks_identity, overfitting_check

    table = pd.DataFrame({"kind": ["evaluation", "general", "general"], "question": ["你是谁", "你好", "1+1"],
                          "before": ["a", "b", "c"], "after": [IDENTITY, IDENTITY, "2"], "reference": ["", "", ""]})
    verdict = overfitting_check(table, IDENTITY)
    assert verdict["identity_on_general"] == 1 and verdict["overfitted"] is False
    table.loc[2, "after"] = "A week has seven days.8B大模型哦"  # a piece of the identity glued on counts too
    assert overfitting_check(table, IDENTITY)["overfitted"] is True
    assert not leaks_identity("我是一个AI助手，可以回答你的问题。", IDENTITY)  # a few shared characters do not


def test_chat_keeps_the_newest_turns_that_fit_and_says_so(final_chat):
    import io

    from helpers.chat import ChatSession, GenerationSettings, run_cli
    from helpers.generation import fit_history

    model, tokenizer = final_chat
    history = [m for i in range(40) for m in ({"role": "user", "content": f"问题{i} " * 20},
                                              {"role": "assistant", "content": f"回答{i} " * 20})]
    messages, dropped = fit_history(tokenizer, "你是谁", "", history, context=2048, reserve=64)
    length = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert 0 < dropped < 40 and length + 64 <= 2048
    assert messages[-1]["content"] == "你是谁" and messages[-2] == history[-1]  # the newest turns stay, whole
    assert messages[0] == history[2 * dropped]
    session = ChatSession(model, tokenizer, settings=GenerationSettings(64), history=list(history))
    out = io.StringIO()
    run_cli(session, stdin=io.StringIO("你是谁\nEXIT\n"), stdout=out)
    assert session.dropped == dropped and f"(the {dropped} oldest turns no longer fit" in out.getvalue()


def test_cli_prints_the_answer_piece_by_piece(final_chat):
    import io

    from helpers.chat import ChatSession, run_cli

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.writes = []

        def write(self, text):
            self.writes.append(text)
            return super().write(text)

    out = Recorder()
    assert run_cli(ChatSession(*final_chat), stdin=io.StringIO("你是谁\n"), stdout=out) == 0
    start = out.writes.index("助手 >>> ")
    answer_writes = [w for w in out.writes[start + 1:out.writes.index("\n", start)] if w]
    assert len(answer_writes) > 1  # streamed, not printed at the end in one go
    assert "".join(answer_writes).strip() == ChatSession(*final_chat).ask("你是谁")


def test_a_work_dirs_model_folder_that_records_a_real_base_loads_that_base(tmp_path, tiny_model_dir):
    """`helpers chat WORK/model --adapter WORK/adapter`: WORK/model holds only a record for a real base model."""
    import json
    from pathlib import Path

    from helpers.chat import load_chat_model
    from helpers.tiny_model import RECORD_FILE

    recorded = tmp_path / "model"
    recorded.mkdir()
    (recorded / RECORD_FILE).write_text(json.dumps({"kind": "local", "path": str(tiny_model_dir)}))
    model, tokenizer = load_chat_model(recorded)
    assert Path(model.name_or_path) == Path(tiny_model_dir) and tokenizer is not None


# --- the system prompt the model was trained with, and errors while answering ----------------------

SYSTEM = "You are a helpful assistant."  # a prompt that changes the tiny model's answer to 你是谁 (asserted below)
OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 2.00 GiB"


def fail_first_answer(monkeypatch, model) -> None:
    """The model's next generate() raises as a GPU out of memory does; later ones answer."""
    real, failed = model.generate, []

    def generate(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise RuntimeError(OUT_OF_MEMORY)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)


@pytest.fixture(scope="module")
def tiny_chat(tiny_model_dir):
    from helpers.chat import load_chat_model

    return load_chat_model(tiny_model_dir)


@pytest.fixture(scope="module")
def trained_with_system(tiny_model_dir, tmp_path_factory):
    """A model folder that records the system prompt it was trained with (chat_defaults.json, as merge writes it)."""
    import shutil

    from helpers.chat import write_chat_defaults

    folder = tmp_path_factory.mktemp("system") / "assistant"
    shutil.copytree(tiny_model_dir, folder)
    write_chat_defaults(folder, SYSTEM)
    return folder


def test_trained_system_prompt_comes_from_the_adapter_or_the_model_folder(tmp_path):
    import json

    from helpers.base_model import ModelPathError
    from helpers.chat import trained_system_prompt, write_chat_defaults

    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir()
    adapter.mkdir()
    assert trained_system_prompt(model) is None  # nothing records one
    write_chat_defaults(model, "from the model")
    assert trained_system_prompt(model) == "from the model"
    (adapter / "training_record.json").write_text(json.dumps({"hyper_parameters": {"system": "from training"}}))
    assert trained_system_prompt(model, adapter) == "from training"  # base + adapter: the adapter's training says
    write_chat_defaults(model, "")
    assert trained_system_prompt(model) == ""  # trained with none is known, not unknown
    (model / "chat_defaults.json").write_text("{not json")
    with pytest.raises(ModelPathError, match=r"chat_defaults.json: has no readable 'system' field"):
        trained_system_prompt(model)


def test_cli_answers_with_the_trained_system_prompt(trained_with_system, tiny_chat):
    from helpers.generation import generate_answers

    course, bare = (generate_answers(*tiny_chat, ["你是谁"], system=s, max_new_tokens=32)[0] for s in (SYSTEM, ""))
    assert course != bare  # the prompt changes the answer, so the served answer tells which prompt it had
    result = run_chat_cli([trained_with_system, "--max-new-tokens", "32"], "你是谁\n")
    assert result.returncode == 0, result.stderr
    assert f"system prompt: {SYSTEM!r}" in result.stdout and f"助手 >>> {course}\n" in result.stdout
    result = run_chat_cli([trained_with_system, "--max-new-tokens", "32", "--system", ""], "你是谁\n")
    assert result.returncode == 0, result.stderr
    assert f"助手 >>> {bare}\n" in result.stdout


def test_cli_with_an_adapter_takes_the_system_prompt_it_was_trained_with(tiny_model_dir, tmp_path):
    import json

    from helpers.chat import ChatSession, GenerationSettings, load_chat_model

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=3, scale=0.02)
    (adapter / "training_record.json").write_text(json.dumps({"hyper_parameters": {"system": SYSTEM}}))
    model, tokenizer = load_chat_model(tiny_model_dir, adapter)
    expected = ChatSession(model, tokenizer, SYSTEM, GenerationSettings(32)).ask("你是谁")
    assert expected != ChatSession(model, tokenizer, "", GenerationSettings(32)).ask("你是谁")
    result = run_chat_cli([tiny_model_dir, "--adapter", adapter, "--max-new-tokens", "32"], "你是谁\n")
    assert result.returncode == 0, result.stderr
    assert f"助手 >>> {expected}\n" in result.stdout


def test_cli_names_a_generation_error_and_goes_on(tiny_chat, monkeypatch):
    import io

    from helpers.chat import ChatSession, GenerationSettings, run_cli

    model, tokenizer = tiny_chat
    expected = ChatSession(model, tokenizer, settings=GenerationSettings(16)).ask("你是谁")
    fail_first_answer(monkeypatch, model)
    session = ChatSession(model, tokenizer, settings=GenerationSettings(16))
    out = io.StringIO()
    assert run_cli(session, stdin=io.StringIO("你是谁\n你是谁\nEXIT\n"), stdout=out) == 0
    text = out.getvalue()
    assert f"error: The model could not answer (RuntimeError: {OUT_OF_MEMORY}); the question was not added" in text
    assert "Traceback" not in text and text.rstrip().endswith("bye")
    assert session.history == [{"role": "user", "content": "你是谁"}, {"role": "assistant", "content": expected}]


def test_widget_shows_a_generation_error_and_keeps_it_out_of_the_history(tiny_chat, monkeypatch):
    from helpers.chat import ChatError, chat_widget

    model, tokenizer = tiny_chat
    widget = chat_widget(model, tokenizer)
    fail_first_answer(monkeypatch, model)
    widget.text.value = "你是谁"  # Enter: the error goes to the transcript, not out of the callback
    assert widget.session.history == []
    assert "error:" in widget.transcript.value and OUT_OF_MEMORY in widget.transcript.value
    assert "▌" not in widget.transcript.value  # no half answer left standing
    fail_first_answer(monkeypatch, model)
    with pytest.raises(ChatError, match=r"^The model could not answer \(RuntimeError: CUDA out of memory"):
        widget.ask("你是谁")  # called from code, as the notebook's demo cell does
    answer = widget.ask("你是谁")
    assert widget.session.history[-1]["content"] == answer and len(widget.session.history) == 2
    assert "error:" not in widget.transcript.value  # the next answer clears it


def test_cli_takes_the_courses_prompt_template_and_names_a_wrong_one(adapter_and_final):
    """`xtuner chat MODEL --prompt-template internlm2_chat` works as typed: the template is the tokenizer's, the
    option is checked against it, and a name that is not the model's is one sentence before anything runs."""
    final = adapter_and_final[1]
    result = run_chat_cli([final, "--prompt-template", "internlm2_chat", "--max-new-tokens", "16"], "你是谁\nEXIT\n")
    assert result.returncode == 0, result.stderr
    assert "prompt template: internlm2_chat (the layout of the chat template in the model's tokenizer" in result.stdout
    assert "用户 >>> 你是谁\n助手 >>> " in result.stdout  # piped input is echoed: the transcript reads as typed
    for name, said in (("alpaca", "is not a template the kit knows (internlm2_chat, qwen_chat, llama3_chat)"),
                       ("llama3_chat", "does not match this model's own chat template")):
        result = run_chat_cli([final, "--prompt-template", name], "你是谁\n")
        assert result.returncode == 2 and said in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "助手 >>>" not in result.stdout


def test_terminal_transcript_is_the_chat_command_with_typed_lines(adapter_and_final, final_chat):
    from helpers.chat import ChatSession, GenerationSettings
    from helpers.terminal import terminal_transcript

    final = adapter_and_final[1]
    text = terminal_transcript(final, ["你是谁", "RESET", "你好"], "--prompt-template", "internlm2_chat",
                               "--max-new-tokens", "24")
    assert text.startswith(f"$ python -m helpers chat {final} --prompt-template internlm2_chat --max-new-tokens 24\n")
    expected = ChatSession(*final_chat, settings=GenerationSettings(24)).ask("你是谁")
    assert f"用户 >>> 你是谁\n助手 >>> {expected}\n" in text
    assert "用户 >>> RESET\n(history cleared: 1 turns forgotten)" in text and text.rstrip().endswith("bye")
    with pytest.raises(RuntimeError, match="the terminal chat stopped with exit code 2: error: .*no such directory"):
        terminal_transcript(final.parent / "nowhere", ["你是谁"])


def test_notebook_04_records_whole_answers_and_its_transcripts(course_work):
    """The headless demo ends on whole answers, never a broken piece of the identity (the tiny model learned
    one-turn chats, so each demo message is a conversation of its own); its chats are recorded for the report."""
    import json

    from helpers.chat import leaks_identity

    r = json.loads(course_work.result("04_chat_demo").read_text(encoding="utf-8"))
    answers = [m["content"] for m in r["chat_transcript"] if m["role"] == "assistant"]
    assert len(answers) == 2 and answers[0] == IDENTITY
    assert all(IDENTITY in a or not leaks_identity(a, IDENTITY) for a in answers), answers
    assert r["terminal_transcript"].startswith("$ python -m helpers chat ") and "用户 >>> RESET" in r["terminal_transcript"]
    assert [m["role"] for m in r["web_transcript"]] == ["user", "assistant"]


def test_the_contrast_loss_is_shown_once_under_its_own_title(course_work):
    import nbformat

    from helpers.contrast import loss_comparison_figure

    ax = loss_comparison_figure(course_work).axes[0]
    assert ax.get_title() == "Loss: the mixed run and the over-fitted contrast"
    assert [line.get_label() for line in ax.lines] == ["mixed run (notebook 02)", "over-fitted contrast (identity only)"]
    assert (course_work.contrast / "loss_comparison.png").stat().st_size > 0
    nb = nbformat.read(course_work.executed / "04_chat_demo.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "overfitted_run(" in c.source)
    assert sum("image/png" in o.get("data", {}) for o in cell.outputs) == 1  # the comparison, not the live plot too
