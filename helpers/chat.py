"""Chatting with a model: token streaming, multi-turn history, the before/after table, the notebook
widget, and the terminal chat (`python -m helpers chat MODEL_DIR`) and web demo (`python -m helpers web`)."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .base_model import ModelPathError
from .chat_defaults import CHAT_DEFAULTS_FILE, trained_system_prompt, write_chat_defaults  # noqa: F401
from .generation import context_length, fit_history, generate_answers
from .merge import AdapterError, UnverifiedModelError, check_adapter_dir, load_model, load_tokenizer, require_verified
from .template import TemplateError, stop_token_ids
from .terminal import generation_problem, run_cli




class ChatError(RuntimeError):
    """The model could not answer; the message says why in one sentence."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (the same answer every time)
    top_p: float = 1.0


def load_chat_model(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None):
    """(model, tokenizer) for chatting: a full model, or a base model with an adapter on top (the kit's, or XTuner's
    pth_to_hf folder or iter_N.pth, converted for this session as `xtuner chat BASE --adapter ADAPTER` takes it)."""
    from .base_model import loadable_model_dir
    from .xtuner import converted_adapter, xtuner_format

    model_dir = loadable_model_dir(model_dir)  # `chat work/model --adapter work/adapter` for a real base model too
    if adapter is not None and xtuner_format(adapter):
        with converted_adapter(adapter, model_dir) as kit:
            return load_model(model_dir, kit), load_tokenizer(model_dir, kit)
    return load_model(model_dir, adapter), load_tokenizer(model_dir, adapter)


def stream_reply(model, tokenizer, messages: list[dict], settings: GenerationSettings | None = None):
    """Yield the assistant's reply piece by piece as it is generated (TextIteratorStreamer + a thread)."""
    import torch
    from transformers import TextIteratorStreamer

    settings = settings or GenerationSettings()
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True).to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    sample = settings.temperature > 0
    kwargs = dict(**enc, streamer=streamer, max_new_tokens=int(settings.max_new_tokens), do_sample=sample,
                  eos_token_id=stop_token_ids(tokenizer, getattr(model, "generation_config", None)),
                  pad_token_id=tokenizer.pad_token_id)
    if sample:
        kwargs.update(temperature=float(settings.temperature), top_p=float(settings.top_p))
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    errors = []

    def work():
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except Exception as e:  # re-raised in the caller's thread after the streamer ends
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


@dataclass
class ChatSession:
    """A conversation: the system prompt, the turns so far, and the generation settings."""

    model: object
    tokenizer: object
    system: str = ""
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    history: list[dict] = field(default_factory=list)
    dropped: int = 0  # older turns left out of the last prompt, so that it fits the model's context

    def send(self, text: str):
        """Yield the reply's pieces; when it is complete, the turn joins the history. The prompt keeps the
        newest turns that fit the model's context with room for the answer (`dropped` says how many did not)."""
        pieces = []
        messages, self.dropped = fit_history(self.tokenizer, text, self.system, self.history,
                                             context_length(self.model), int(self.settings.max_new_tokens))
        for piece in stream_reply(self.model, self.tokenizer, messages, self.settings):
            pieces.append(piece)
            yield piece
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces).strip()}]

    def ask(self, text: str) -> str:
        return "".join(self.send(text)).strip()

    def reset(self) -> None:
        self.history, self.dropped = [], 0


# --- before / after ------------------------------------------------------------------------------

@dataclass
class CourseModels:
    """The models a notebook compares, each loaded once: the base model with its adapters by name (switched with
    set_adapter; all off in peft's disable_adapter() for the base itself) and final_model."""

    base: object
    final: object | None
    tokenizers: dict
    adapters: dict = field(default_factory=dict)  # the course's name of each adapter -> its name in peft

    @contextlib.contextmanager
    def use(self, name: str):
        """(model, tokenizer) as `name`: "base", "final_model", or an adapter's name on the base."""
        if name == "final_model":
            yield self.final, self.tokenizers[name]
        elif name == "base" and hasattr(self.base, "disable_adapter"):
            with self.base.disable_adapter():
                yield self.base, self.tokenizers[name]
        elif name == "base":
            yield self.base, self.tokenizers[name]
        else:
            self.base.set_adapter(self.adapters[name])
            yield self.base, self.tokenizers[name]

    def free(self, *names: str) -> None:
        """Let go of "base" and/or "final_model" once no later cell needs them (their memory returns at once)."""
        import gc

        import torch

        for name in names:
            setattr(self, "final" if name == "final_model" else name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_course_models(base_model, final_model=None, adapters: dict | None = None) -> CourseModels:
    """The base model loaded once with every adapter in `adapters` ({name: folder}, None entries skipped) on top,
    and final_model; loading goes through load_model, so bad folders get its one sentence."""
    from .base_model import loadable_model_dir

    base_model = loadable_model_dir(base_model)
    adapters = {name: Path(folder) for name, folder in (adapters or {}).items() if folder}
    names = list(adapters)
    base = load_model(base_model, adapters[names[0]] if names else None)  # the first adapter is peft's "default"
    tokenizers, peft_names = {"base": load_tokenizer(base_model)}, {}
    for i, name in enumerate(names):
        peft_names[name] = "default" if i == 0 else name
        if i:
            base.load_adapter(check_adapter_dir(adapters[name]), adapter_name=name)
        tokenizers[name] = load_tokenizer(base_model, adapters[name])
    final = None
    if final_model is not None:
        final = load_model(final_model)
        tokenizers["final_model"] = load_tokenizer(final_model)
    return CourseModels(base, final, tokenizers, peft_names)


def before_after(base_model, final_model, evaluation_inputs: list[str], general: list[dict],
                 system: str = "", max_new_tokens: int = 64, overfitted_adapter=None,
                 models: CourseModels | None = None):
    """The same prompts answered by the base model and by final_model, side by side (a DataFrame).

    `general` holds {"input", "output"} pairs: ordinary questions with a reference answer.
    `overfitted_adapter`: a contrast adapter on the base model, answered in an "over-fitted" column.
    `models`: the notebook's models, already loaded (load_course_models, the contrast adapter named "over-fitted");
    without it they are loaded here, each once.
    """
    import pandas as pd

    questions = list(evaluation_inputs) + [g["input"] for g in general]
    kinds = ["evaluation"] * len(evaluation_inputs) + ["general"] * len(general)
    references = [""] * len(evaluation_inputs) + [g["output"] for g in general]
    if models is None:
        models = load_course_models(base_model, final_model, {"over-fitted": overfitted_adapter})
    labels = {"before": "base", "after": "final_model"}
    if overfitted_adapter:
        labels["over-fitted"] = "over-fitted"
    columns = {}
    for label, name in labels.items():
        with models.use(name) as (model, tokenizer):
            columns[label] = generate_answers(model, tokenizer, questions, system=system,
                                              max_new_tokens=max_new_tokens, label="before/after")
    return pd.DataFrame({"kind": kinds, "question": questions, **columns, "reference": references})


LEAK_RUN = 6  # characters of the identity in a row that count as the identity leaking into an answer


def leaks_identity(answer: str, identity: str) -> bool:
    """Whether `answer` repeats the identity sentence, or a run of LEAK_RUN of its characters (the over-fitted
    model often glues a piece of it onto, or in place of, an ordinary answer)."""
    from difflib import SequenceMatcher

    if identity in answer:
        return True
    match = SequenceMatcher(None, answer, identity, autojunk=False).find_longest_match(0, len(answer), 0, len(identity))
    return match.size >= min(LEAK_RUN, len(identity))


def overfitting_check(table, identity: str, column: str = "after") -> dict:
    """On general questions the model never saw: how often `column`'s model answers with its identity.
    Over-fitted: it leaks the identity into more than half of them."""
    general = table[table["kind"] == "general"]
    evaluation = table[table["kind"] == "evaluation"]
    leaked = general[column].map(lambda a: leaks_identity(a, identity))
    return {"general_questions": int(len(general)), "identity_on_general": int(leaked.sum()),
            "identity_share_on_general": float(leaked.mean()) if len(general) else 0.0,
            "general_unchanged": int((general["before"] == general[column]).sum()),
            "identity_on_evaluation": int(evaluation[column].str.contains(identity, regex=False).sum()),
            "evaluation_questions": int(len(evaluation)),
            "overfitted": bool(len(general) and leaked.mean() > 0.5)}


def general_questions(n: int | None = None) -> list[dict]:
    """Held-out general questions as {"input", "output"} pairs (data/general_heldout.json): never in the
    training mix and never in the tiny model's pre-training, so a regression on them is real."""
    from .data import heldout_general_samples

    return heldout_general_samples()[:n]


# --- the notebook widget -------------------------------------------------------------------------

class ChatWidget:
    """An ipywidgets chat: a transcript, a text box, Send / Reset, and the generation settings."""

    def __init__(self, session: ChatSession):
        import ipywidgets as w

        self.session, self.error = session, None
        s = session.settings
        self.max_new_tokens = w.IntSlider(value=s.max_new_tokens, min=8, max=1024, step=8, description="max tokens")
        self.temperature = w.FloatSlider(value=s.temperature, min=0.0, max=1.5, step=0.05, description="temperature")
        self.top_p = w.FloatSlider(value=s.top_p, min=0.05, max=1.0, step=0.05, description="top-p")
        self.system = w.Text(value=session.system, description="system", layout=w.Layout(width="95%"))
        self.transcript = w.HTML(layout=w.Layout(border="1px solid #ccc", padding="6px", min_height="120px"))
        self.text = w.Text(placeholder="Type a message and press Enter", layout=w.Layout(width="70%"))
        self.send_button = w.Button(description="Send", button_style="primary")
        self.reset_button = w.Button(description="Reset")
        self.send_button.on_click(lambda _: self._send(self.text.value))
        self.reset_button.on_click(lambda _: self.reset())
        self.text.continuous_update = False
        self.text.observe(lambda change: self._send(change["new"]), names="value")
        self.ui = w.VBox([w.HBox([self.max_new_tokens, self.temperature, self.top_p]), self.system,
                          self.transcript, w.HBox([self.text, self.send_button, self.reset_button])])
        self._render()

    def _render(self, pending: str | None = None, partial: str = "") -> None:
        import html

        rows = [(m["role"], m["content"]) for m in self.session.history]
        if pending is not None:
            rows += [("user", pending), ("assistant", partial + " ▌")]
        note = (f"<p><i>({self.session.dropped} oldest turns left out: they no longer fit the model's context)</i></p>"
                if self.session.dropped else "")
        error = f'<p style="color:#b00020"><b>error:</b> {html.escape(self.error)}</p>' if self.error else ""
        self.transcript.value = (note + "".join(
            f"<p><b>{'你' if role == 'user' else '助手'}:</b> {html.escape(text)}</p>" for role, text in rows) or
            "<i>(no messages yet)</i>") + error

    def ask(self, text: str) -> str:
        """Send `text` as the Send button does (also callable from code), streaming into the transcript."""
        text = (text or "").strip()
        if not text:
            return ""
        self.text.value = ""
        self.session.system = self.system.value
        self.session.settings = GenerationSettings(self.max_new_tokens.value, self.temperature.value, self.top_p.value)
        partial, self.error = "", None
        try:
            for piece in self.session.send(text):
                partial += piece
                self._render(text, partial)
        except Exception as e:  # shown in the transcript; the session keeps no half turn
            self.error = generation_problem(e)
            self._render()
            raise ChatError(self.error) from None
        self._render()
        return self.session.history[-1]["content"]

    def _send(self, text: str) -> None:
        """What Send and Enter do: the error is already in the transcript, where the person looks."""
        try:
            self.ask(text)
        except ChatError:
            pass

    def reset(self) -> None:
        self.session.reset()
        self.error = None
        self._render()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.ui)


def chat_widget(model, tokenizer, system: str = "", settings: GenerationSettings | None = None) -> ChatWidget:
    return ChatWidget(ChatSession(model, tokenizer, system, settings or GenerationSettings()))


# --- commands ------------------------------------------------------------------------------------

# XTuner's `--prompt-template` names the kit recognises, with the turn layout each writes (a user turn, then the
# assistant's start): the kit always renders with the tokenizer's own chat template, the option only checks it.
PROMPT_TEMPLATES = {
    "internlm2_chat": "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
    "qwen_chat": "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
    "llama3_chat": "<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}


def check_prompt_template(name: str, tokenizer=None) -> str:
    """The line the chat prints for `--prompt-template NAME` (the course's `xtuner chat` option); a name XTuner's
    templates do not have, or one whose layout is not the tokenizer's, raises TemplateError in one sentence."""
    known = ", ".join(PROMPT_TEMPLATES)
    if name not in PROMPT_TEMPLATES:
        raise TemplateError(f"--prompt-template {name!r} is not a template the kit knows ({known}); leave the option "
                            "out: the chat uses the template the model's tokenizer carries.")
    if tokenizer is not None:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                                 add_generation_prompt=True)
        if PROMPT_TEMPLATES[name].format(q="你好") not in rendered:
            raise TemplateError(f"--prompt-template {name} does not match this model's own chat template; leave the "
                                "option out: the chat uses the template the model's tokenizer carries.")
    return (f"prompt template: {name} (the layout of the chat template in the model's tokenizer, which the chat uses; "
            "the option is only checked)")

def _default_model_dir(vlm: bool = False) -> str:
    from .paths import work

    w = work(create=False)
    return str(w.vlm_final_model if vlm else w.final_model)


def add_command(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (streams; RESET / EXIT)")
    p.add_argument("model_dir", nargs="?", default=None,
                   help="model directory (default: WORK/final_model; with --image WORK/vlm/final_model)")
    p.add_argument("--adapter", default=None, help="a PEFT adapter directory to put on top of MODEL_DIR")
    p.add_argument("--system", default=None,
                   help="system prompt (default: the one the model was trained with; \"\" for none)")
    p.add_argument("--image", default=None, help="an image file: chat with a vision-language model about it")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--unverified", action="store_true",
                   help="chat with a final_model whose merge check is missing or out of date (said on screen)")
    p.add_argument("--prompt-template", default=None, metavar="NAME",
                   help="xtuner chat's option, e.g. internlm2_chat: checked against the template the model's "
                        "tokenizer carries, which the chat always uses")
    p.set_defaults(func=_chat)
    w = sub.add_parser("web", help="the Streamlit chat demo in the browser")
    w.add_argument("model_dir", nargs="?", default=None, help="model directory (default: WORK/final_model)")
    w.add_argument("--port", type=int, default=8501)
    w.add_argument("--address", default="localhost", help="address to listen on (0.0.0.0: every interface)")
    w.add_argument("--system", default=None,
                   help="the sidebar's starting system prompt (default: the one the model was trained with)")
    w.add_argument("--unverified", action="store_true",
                   help="serve a final_model whose merge check is missing or out of date (said on the page)")
    w.set_defaults(func=_web)


def _chat(args) -> int:
    from .progress import quiet_libraries

    quiet_libraries()
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    try:
        model_dir = args.model_dir or _default_model_dir(vlm=bool(args.image))
        system = args.system
        if system is None:  # the prompt the model was trained with, as notebooks 02-04 and the checker ask
            system = trained_system_prompt(model_dir, None if args.image else args.adapter) or ""
        where = "given with --system" if args.system is not None else "the one the model was trained with"
        if args.prompt_template is not None:
            check_prompt_template(args.prompt_template)  # an unknown name stops before any model loads
        if args.image:
            from . import vlm_chat

            print(f"system prompt: {system!r} ({where})", flush=True)
            return int(vlm_chat.run_cli(model_dir, args.image, system, max_new_tokens=args.max_new_tokens) or 0)
        warning = require_verified(model_dir, args.unverified) if args.adapter is None else ""
        model, tokenizer = load_chat_model(model_dir, args.adapter)
        stop_token_ids(tokenizer, model.generation_config)
        template = check_prompt_template(args.prompt_template, tokenizer) if args.prompt_template is not None else ""
    except (ModelPathError, AdapterError, TemplateError, UnverifiedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if warning:
        print(warning, flush=True)
    if template:
        print(template, flush=True)
    print(f"system prompt: {system!r} ({where})", flush=True)
    return run_cli(ChatSession(model, tokenizer, system, settings))


def web_command(model_dir, port: int = 8501, address: str = "localhost", system: str | None = None) -> list[str]:
    """The streamlit command line that serves helpers/web_app.py for `model_dir` (system: the sidebar's starting
    system prompt; None: the one the model was trained with, read by the page from the model folder)."""
    app = Path(__file__).with_name("web_app.py")
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
            "--server.address", address, "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none",  # a demo, not a dev server: do not scan transformers' modules
            "--client.toolbarMode", "minimal",
            "--", "--model-dir", str(Path(model_dir).resolve()), *([f"--system={system}"] if system is not None else [])]


def web_demo_transcript(model_dir, messages: list[str], system: str | None = None):
    """Run the web demo (helpers/web_app.py) headless with streamlit's AppTest, type `messages` into its chat
    box one by one, and return what the page shows: a DataFrame of (role, text), one row per chat bubble.
    system: typed into the sidebar first (None: the page's default, the prompt the model was trained with)."""
    import pandas as pd
    from streamlit.testing.v1 import AppTest

    from .web_app import MODEL_DIR_ENV

    import logging

    # AppTest runs the page without a server; streamlit warns about that on every call ("bare mode")
    logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").setLevel(logging.ERROR)
    old = os.environ.get(MODEL_DIR_ENV)
    os.environ[MODEL_DIR_ENV] = str(Path(model_dir).resolve())
    try:
        at = AppTest.from_file(str(Path(__file__).with_name("web_app.py")), default_timeout=600).run()
        if system is not None:
            at.sidebar.text_area[0].set_value(system).run()
        for text in messages:
            at.chat_input[0].set_value(text).run()
    finally:
        if old is None:
            os.environ.pop(MODEL_DIR_ENV, None)
        else:
            os.environ[MODEL_DIR_ENV] = old
    problems = [e.value for e in at.error] + [str(e.value) for e in at.exception]
    if problems:
        raise RuntimeError(f"the web demo failed: {problems[0]}")
    return pd.DataFrame([{"role": m.name, "text": m.markdown[0].value if m.markdown else ""} for m in at.chat_message])


def _web(args) -> int:
    from .base_model import check_model_dir

    model_dir = args.model_dir or _default_model_dir()
    try:
        check_model_dir(model_dir)
        warning = require_verified(model_dir, args.unverified)
    except (ModelPathError, UnverifiedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if warning:  # the page shows it above the chat
        print(warning, flush=True)
        from .web_app import WARNING_ENV

        os.environ[WARNING_ENV] = warning
    print(f"Serving the chat demo for {model_dir} at http://{args.address}:{args.port} (Ctrl+C stops it)", flush=True)
    command = web_command(model_dir, args.port, args.address, args.system)
    os.execv(command[0], command)  # streamlit takes this process's place, so stopping it stops the server
