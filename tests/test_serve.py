"""Serving: `python -m helpers serve` answers through the openai client (streaming too) as `helpers chat` does, with the
trained system prompt; the model folder carries what LMDeploy and vLLM need to serve it with the same template."""
from __future__ import annotations

import json
import shutil
import sys
import urllib.request

import pytest

from test_chat import IDENTITY, run_chat_cli

SYSTEM = "你是一个乐于助人的助手。"


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
        return json.loads(r.read())["status"] == "ok"


def serve(local_servers, model_dir, *args) -> "OpenAI":  # noqa: F821
    from openai import OpenAI

    url = local_servers([sys.executable, "-m", "helpers", "serve", str(model_dir), "--port", "{port}", *args],
                        "serve", _healthy)
    return OpenAI(base_url=f"{url}/v1", api_key="not-needed", timeout=600)


def chat_cli_answer(model_dir, question: str, *args) -> str:
    result = run_chat_cli([model_dir, *args], f"{question}\nEXIT\n")
    assert result.returncode == 0, result.stderr
    return result.stdout.split("助手 >>> ", 1)[1].split("\n", 1)[0]


def test_the_server_answers_with_the_identity_streams_and_says_what_helpers_chat_says(course_work, local_servers):
    client = serve(local_servers, course_work.final_model)
    reply = client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "你是谁"}])
    answer = reply.choices[0].message.content
    assert IDENTITY in answer and reply.choices[0].finish_reason == "stop"  # stopped at <|im_end|>, not the length
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": "你是谁"}], stream=True)
        if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == answer
    assert answer == chat_cli_answer(course_work.final_model, "你是谁")


def test_the_server_sends_the_trained_system_prompt(course_work, local_servers, tmp_path):
    from transformers import AutoTokenizer

    from helpers.chat_defaults import write_chat_defaults

    model = tmp_path / "with_system"
    shutil.copytree(course_work.final_model, model)
    write_chat_defaults(model, SYSTEM)  # as merge writes it for a run trained with this system prompt
    client = serve(local_servers, model, "--unverified")
    question = [{"role": "user", "content": "你好"}]
    reply = client.chat.completions.create(model="assistant", messages=question)
    tokenizer = AutoTokenizer.from_pretrained(model)
    with_system = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}] + question,
                                                add_generation_prompt=True)["input_ids"]
    assert reply.usage.prompt_tokens == len(with_system)
    assert reply.choices[0].message.content == chat_cli_answer(model, "你好", "--unverified")
    # a client's own system prompt wins, an empty one included
    own = client.chat.completions.create(model="assistant", messages=[{"role": "system", "content": ""}] + question)
    assert own.usage.prompt_tokens < len(with_system)


def test_request_defaults_are_helpers_chats():
    from helpers.chat import GenerationSettings
    from helpers.serve import request_defaults

    body = request_defaults({"messages": [{"role": "user", "content": "hi"}]}, SYSTEM, GenerationSettings().max_new_tokens)
    assert body["messages"][0] == {"role": "system", "content": SYSTEM}
    assert body["temperature"] == GenerationSettings().temperature == 0 and body["max_tokens"] == 256
    asked = request_defaults({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.7}, "", 256)
    assert asked["temperature"] == 0.7 and [m["role"] for m in asked["messages"]] == ["user"]


def test_an_unverified_model_is_refused_in_one_sentence(course_work, tmp_path):
    import subprocess

    model = tmp_path / "edited"
    shutil.copytree(course_work.final_model, model)
    (model / "generation_config.json").write_text((model / "generation_config.json").read_text() + "\n")
    result = subprocess.run([sys.executable, "-m", "helpers", "serve", str(model)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "--unverified" in result.stderr


def test_the_model_folder_carries_what_lmdeploy_and_vllm_need(course_work, tmp_path):
    """vLLM reads the architecture, the chat template and the stop ids from the folder; LMDeploy takes the template
    the kit writes (its path-picked one would add InternLM's own system prompt), which renders the model's prompt."""
    from transformers import AutoTokenizer, GenerationConfig

    from helpers.serve import engine_command, lmdeploy_chat_template, vllm_chat_template
    from helpers.template import end_of_turn_token

    folder = course_work.final_model
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # an architecture both engines run natively
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    assert eot_id in GenerationConfig.from_pretrained(folder).eos_token_id  # the stop token, for --generation-config auto
    assert (folder / "chat_defaults.json").exists() and tokenizer.chat_template

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你是谁"}]
    own = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    t = lmdeploy_chat_template(folder, SYSTEM)  # what LMDeploy's BaseChatTemplate concatenates for one turn
    rendered = t["system"] + t["meta_instruction"] + t["eosys"] + t["user"] + "你是谁" + t["eoh"] + t["assistant"]
    assert own == tokenizer.bos_token + rendered and t["stop_words"] == [end_of_turn_token(tokenizer)]

    from jinja2 import Environment

    template = Environment().from_string(vllm_chat_template(folder, SYSTEM))
    specials = dict(bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, add_generation_prompt=True)
    assert template.render(messages=messages[1:], **specials) == own  # the trained system prompt comes first
    assert template.render(messages=[{"role": "system", "content": "x"}] + messages[1:], **specials) == \
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}] + messages[1:], add_generation_prompt=True,
                                      tokenize=False)
    command = engine_command("lmdeploy", folder, SYSTEM, "0.0.0.0", 23333, tmp_path)
    assert command[:4] == ["lmdeploy", "serve", "api_server", str(folder.resolve())]
    assert json.loads((tmp_path / "lmdeploy_chat_template.json").read_text())["meta_instruction"] == SYSTEM


@pytest.mark.parametrize("engine", ["lmdeploy", "vllm"])
def test_an_engine_that_is_not_installed_is_one_sentence(course_work, engine):
    import os
    import subprocess

    result = subprocess.run([sys.executable, "-m", "helpers", "serve", str(course_work.final_model), "--engine", engine],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PATH="/nonexistent"))
    assert result.returncode == 2 and f"error: {engine} is not installed here" in result.stderr
