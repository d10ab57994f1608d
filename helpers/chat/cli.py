"""`python -m helpers chat` (the terminal chat, XTuner's --prompt-template spelling checked) and
`python -m helpers web` (the web demo)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..base_model import ModelPathError
from ..chat_defaults import trained_system_prompt
from ..merge import AdapterError, UnverifiedModelError, require_verified
from ..paths import WEB_APP
from ..template import TemplateError, stop_token_ids
from ..terminal import run_cli
from .session import ChatSession, GenerationSettings, load_chat_model


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
    from ..paths import work

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
    from ..progress import quiet_libraries

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
            from .. import vlm_chat

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
    app = WEB_APP
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

    from ..web_app import MODEL_DIR_ENV

    import logging

    # AppTest runs the page without a server; streamlit warns about that on every call ("bare mode")
    logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").setLevel(logging.ERROR)
    old = os.environ.get(MODEL_DIR_ENV)
    os.environ[MODEL_DIR_ENV] = str(Path(model_dir).resolve())
    try:
        at = AppTest.from_file(str(WEB_APP), default_timeout=600).run()
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
    from ..base_model import check_model_dir

    model_dir = args.model_dir or _default_model_dir()
    try:
        check_model_dir(model_dir)
        warning = require_verified(model_dir, args.unverified)
    except (ModelPathError, UnverifiedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if warning:  # the page shows it above the chat
        print(warning, flush=True)
        from ..web_app import WARNING_ENV

        os.environ[WARNING_ENV] = warning
    print(f"Serving the chat demo for {model_dir} at http://{args.address}:{args.port} (Ctrl+C stops it)", flush=True)
    command = web_command(model_dir, args.port, args.address, args.system)
    os.execv(command[0], command)  # streamlit takes this process's place, so stopping it stops the server
