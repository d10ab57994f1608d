"""A Streamlit chat demo over a Hugging Face chat model directory (self-contained: streamlit, transformers,
torch and the standard library only, so this one file can be deployed on its own).

Which model: the `--model-dir DIR` argument, else the CHAT_MODEL_DIR environment variable, else a
`final_model` folder beside this file. The sidebar's system prompt starts as `--system TEXT`, else the one the
model was trained with (its folder's chat_defaults.json), else none.

    streamlit run web_app.py -- --model-dir WORK/final_model
    CHAT_MODEL_DIR=WORK/final_model streamlit run web_app.py
    python -m helpers web WORK/final_model --port 8501        (inside the course kit)

Or from Python, inside a streamlit script: `render_app("path/to/final_model")`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

import streamlit as st

WARNING_ENV = "CHAT_MODEL_WARNING"  # set by `helpers web --unverified`: shown above the chat
MODEL_DIR_ENV = "CHAT_MODEL_DIR"
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")
TITLE = "我的小助手 · chat demo"
CHAT_DEFAULTS_FILE = "chat_defaults.json"  # the system prompt the model was trained with (helpers.chat writes it)


def _args(argv: list[str] | None):
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--system", default=None)
    return parser.parse_known_args(sys.argv[1:] if argv is None else argv)[0]


def model_dir_from_args(argv: list[str] | None = None) -> str:
    """--model-dir from the command line, else $CHAT_MODEL_DIR, else ./final_model beside this file."""
    return _args(argv).model_dir or os.environ.get(MODEL_DIR_ENV) or str(Path(__file__).resolve().parent / "final_model")


def system_from_args(argv: list[str] | None = None) -> str | None:
    """--system from the command line (None: not given)."""
    return _args(argv).system


def trained_system(model_dir: str) -> str:
    """The system prompt the model was trained with: chat_defaults.json in its folder (or a training_record.json
    there), else none (helpers.chat.trained_system_prompt; this file stays self-contained)."""
    for name, keys in ((CHAT_DEFAULTS_FILE, ("system",)), ("training_record.json", ("hyper_parameters", "system"))):
        path = Path(model_dir) / name
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
                for key in keys:
                    value = value[key]
            except (ValueError, KeyError, TypeError):
                continue  # the sidebar starts empty; the person can still type a prompt
            return value if isinstance(value, str) else ""
    return ""


def answer_problem(error: BaseException) -> str:
    """One sentence for a failed answer (helpers.chat.generation_problem)."""
    said = (str(error).strip().splitlines() or [""])[0][:200]
    return (f"The model could not answer ({type(error).__name__}{': ' + said if said else ''}); the question was "
            "not added to the conversation: try again, with fewer max new tokens, or reset the conversation.")


def model_problem(model_dir: str) -> str | None:
    """One sentence saying why `model_dir` cannot be served, or None."""
    path = Path(model_dir)
    if not path.is_dir():
        return (f"{path}: no such model directory; pass --model-dir DIR after `--` on the streamlit command line "
                f"or set {MODEL_DIR_ENV}.")
    if not (path / "config.json").exists():
        return f"{path}: has no config.json; point to the folder that save_pretrained wrote (the merged final_model)."
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        return f"{path}: has config.json but no weights (*.safetensors); copy the weight files in."
    return None


@st.cache_resource(show_spinner="Loading the model ...")
def load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer


def stop_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: generation_config's eos (the merge writes the template's stop ids there), eos, im_end."""
    configured = model.generation_config.eos_token_id
    ids = list(configured) if isinstance(configured, (list, tuple)) else ([configured] if configured is not None else [])
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def stream_reply(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float, top_p: float):
    """Yield the reply's text as it is generated (TextIteratorStreamer fed by generate in a thread)."""
    import torch
    from transformers import TextIteratorStreamer

    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    kwargs = dict(**enc, streamer=streamer, max_new_tokens=max_new_tokens, eos_token_id=stop_ids(model, tokenizer),
                  pad_token_id=tokenizer.pad_token_id, do_sample=temperature > 0)
    kwargs.update(dict(temperature=temperature, top_p=top_p) if temperature > 0 else
                  dict(temperature=None, top_p=None, top_k=None))

    errors = []

    def work():
        with torch.no_grad():
            try:
                model.generate(**kwargs)
            except Exception as e:  # re-raised in the page's thread once the stream ends
                errors.append(e)
            finally:
                streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def fit_context(model, tokenizer, system: list[dict], history: list[dict], question: str,
                reserve: int) -> tuple[list[dict], int]:
    """The newest whole turns that leave `reserve` positions for the answer in the model's context, and how
    many older turns were left out (helpers.generation.fit_history; this file stays self-contained)."""
    context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
    for dropped in range(len(history) // 2 + 1):
        messages = system + history[2 * dropped:] + [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        if len(ids) + reserve <= context:
            break
    return messages, dropped


def sidebar(system: str = "") -> dict:
    with st.sidebar:
        st.header("Settings")
        system = st.text_area("System prompt", value=system,
                              help="Sent before the conversation; it starts as the prompt the model was trained with. "
                                   "Empty: none.")
        max_new_tokens = st.slider("Max new tokens", 8, 1024, 256, step=8)
        temperature = st.slider("Temperature", 0.0, 1.5, 0.0, step=0.05, help="0: greedy, the same answer every time.")
        top_p = st.slider("Top-p", 0.05, 1.0, 1.0, step=0.05, help="Used when temperature > 0.")
        if st.button("Reset conversation"):
            st.session_state.history = []
    return {"system": system, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}


def render_app(model_dir: str, system: str | None = None) -> None:
    """The whole page: title, sidebar, the conversation so far, and the chat box. system: the sidebar's starting
    system prompt (None: --system on the command line, else the one the model was trained with)."""
    st.set_page_config(page_title=TITLE, page_icon="💬")
    st.title(TITLE)
    problem = model_problem(model_dir)
    if problem:
        st.error(problem)
        return
    if system is None:
        system = system_from_args()
    settings = sidebar(trained_system(model_dir) if system is None else system)
    st.caption(f"Model: `{model_dir}`")
    if os.environ.get(WARNING_ENV):  # `helpers web --unverified`: the merge check is missing or out of date
        st.warning(os.environ[WARNING_ENV])
    try:
        model, tokenizer = load(str(model_dir))
    except Exception as e:  # a person reads one sentence on the page, not a traceback
        st.error(f"The model in {model_dir} could not be loaded ({type(e).__name__}: "
                 f"{(str(e).strip().splitlines() or [''])[0][:200]}); check that the folder holds a whole saved model.")
        return
    history = st.session_state.setdefault("history", [])
    for message in history:
        with st.chat_message(message["role"]):
            st.markdown(message["content"])
    question = st.chat_input("Ask something, e.g. 你是谁")
    if not question:
        return
    with st.chat_message("user"):
        st.markdown(question)
    system = [{"role": "system", "content": settings["system"]}] if settings["system"].strip() else []
    messages, dropped = fit_context(model, tokenizer, system, history, question, settings["max_new_tokens"])
    if dropped:
        st.info(f"The {dropped} oldest turns no longer fit the model's context and were left out of this answer.")
    with st.chat_message("assistant"):
        try:
            answer = st.write_stream(stream_reply(model, tokenizer, messages, settings["max_new_tokens"],
                                                  settings["temperature"], settings["top_p"]))
        except Exception as e:  # shown where the answer would be; the history keeps no empty or half answer
            st.error(answer_problem(e))
            return
    history += [{"role": "user", "content": question}, {"role": "assistant", "content": str(answer).strip()}]


if __name__ == "__main__":
    render_app(model_dir_from_args())
