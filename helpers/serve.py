"""Serving the assistant as an OpenAI-compatible endpoint (`python -m helpers serve WORK/final_model`):
transformers' own server (`transformers serve`: /v1/chat/completions, streaming), answering as `helpers chat`
does — the model's own chat template and stop tokens, the trained system prompt, greedy, 256 new tokens — and the
files LMDeploy and vLLM need to serve the same model with the same template on a GPU machine."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

ENGINES = ("transformers", "lmdeploy", "vllm")


def request_defaults(body: dict, system: str, max_new_tokens: int) -> dict:
    """A chat request as `helpers chat` would send it: the trained system prompt first when the client sends none
    (an explicit system message, even an empty one, is kept), greedy and `max_new_tokens` unless it asks otherwise."""
    body = dict(body)
    messages = list(body.get("messages") or [])
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    body["messages"] = messages
    body.setdefault("temperature", 0.0)
    body.setdefault("max_tokens", max_new_tokens)
    return body


def build_app(model_dir: str | os.PathLike, system: str, max_new_tokens: int = 256, device: str = "auto"):
    """transformers serve's FastAPI app, pinned to `model_dir`, whose chat handler fills in the kit's defaults
    (request_defaults): the same pieces `transformers serve MODEL_DIR` builds, with that one handler subclassed."""
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    pinned = str(Path(model_dir).resolve())

    class AssistantChatHandler(ChatCompletionHandler):
        async def handle_request(self, body: dict, request_id: str):
            body = request_defaults(body, system, max_new_tokens)
            body["model"] = pinned  # one model per server: any model name a client sends means this one
            return await super().handle_request(body, request_id)

    manager = ModelManager(device=device, dtype="auto", trust_remote_code=False, attn_implementation=None,
                           quantization=None, model_timeout=-1, force_model=pinned)
    state = GenerationState(continuous_batching=False, compile=False, cb_config=None)
    return build_server(manager, AssistantChatHandler(manager, state), completion_handler=CompletionHandler(manager, state),
                        response_handler=ResponseHandler(manager, state),
                        transcription_handler=TranscriptionHandler(manager, state), generation_state=state)


def lmdeploy_chat_template(model_dir: str | os.PathLike, system: str) -> dict:
    """LMDeploy's chat-template JSON (`--chat-template FILE`) for a model in the InternLM2 layout. LMDeploy picks a
    template by the model's path and, unless told, opens with its own system prompt (InternLM's); this one opens with
    the trained system prompt instead (LMDeploy always sends a system turn: with none trained, an empty one). Checked
    against the model's own template, so a layout LMDeploy's internlm2 template cannot render is said, not served."""
    from transformers import AutoTokenizer

    from .template import TemplateError, end_of_turn_token

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eot = end_of_turn_token(tokenizer)
    config = {"model_name": "internlm2", "system": "<|im_start|>system\n", "meta_instruction": system,
              "eosys": f"{eot}\n", "user": "<|im_start|>user\n", "eoh": f"{eot}\n",
              "assistant": "<|im_start|>assistant\n", "eoa": eot, "separator": "\n", "stop_words": [eot]}
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "ping"}]
    own = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours = config["system"] + system + config["eosys"] + config["user"] + "ping" + config["eoh"] + config["assistant"]
    if own.removeprefix(tokenizer.bos_token or "") != ours:
        raise TemplateError(f"{model_dir}: its chat template is not InternLM2's layout, so LMDeploy's internlm2 "
                            "template would change the prompt; serve it with --engine transformers or vllm, which "
                            "use the model's own template.")
    return config


def vllm_chat_template(model_dir: str | os.PathLike, system: str) -> str:
    """The model's own Jinja chat template with the trained system prompt put first when a request has none (vLLM
    reads the template and the stop tokens from the folder itself, but knows no default system prompt)."""
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(model_dir).chat_template
    if not system:
        return template
    default = json.dumps({"role": "system", "content": system}, ensure_ascii=False)
    return ("{% if not messages or messages[0]['role'] != 'system' %}{% set messages = [" + default +
            "] + messages %}{% endif %}" + template)


def engine_command(engine: str, model_dir, system: str, host: str, port: int, files_dir: Path) -> list[str]:
    """The command line that serves `model_dir` on LMDeploy or vLLM with the model's template and trained system
    prompt (the template file is written into `files_dir`)."""
    files_dir.mkdir(parents=True, exist_ok=True)
    model_dir = str(Path(model_dir).resolve())
    if engine == "lmdeploy":
        path = files_dir / "lmdeploy_chat_template.json"
        path.write_text(json.dumps(lmdeploy_chat_template(model_dir, system), ensure_ascii=False, indent=1),
                        encoding="utf-8")
        return ["lmdeploy", "serve", "api_server", model_dir, "--chat-template", str(path), "--server-name", host,
                "--server-port", str(port)]
    path = files_dir / "vllm_chat_template.jinja"
    path.write_text(vllm_chat_template(model_dir, system), encoding="utf-8")
    return ["vllm", "serve", model_dir, "--chat-template", str(path), "--generation-config", "auto", "--host", host,
            "--port", str(port)]


def add_command(sub) -> None:
    p = sub.add_parser("serve", help="serve a model as an OpenAI-compatible endpoint (/v1/chat/completions, streaming)")
    p.add_argument("model_dir", nargs="?", default=None, help="model directory (default: WORK/final_model)")
    p.add_argument("--engine", choices=ENGINES, default="transformers",
                   help="transformers (here, CPU or GPU); lmdeploy or vllm where the GPU machine has them")
    p.add_argument("--host", default="localhost", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--system", default=None,
                   help="default system prompt (default: the one the model was trained with; \"\" for none)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length when a request gives no max_tokens")
    p.add_argument("--unverified", action="store_true",
                   help="serve a final_model whose merge check is missing or out of date (said on start)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import tempfile

    from .base_model import ModelPathError, check_model_dir
    from .chat import _default_model_dir
    from .chat_defaults import trained_system_prompt
    from .merge import UnverifiedModelError, require_verified
    from .progress import quiet_libraries
    from .template import TemplateError, stop_token_ids

    quiet_libraries()
    model_dir = args.model_dir or _default_model_dir()
    try:
        check_model_dir(model_dir)
        warning = require_verified(model_dir, args.unverified)
        system = trained_system_prompt(model_dir) or "" if args.system is None else args.system
        from transformers import AutoTokenizer, GenerationConfig

        stop_token_ids(AutoTokenizer.from_pretrained(model_dir), GenerationConfig.from_pretrained(model_dir))
        if args.engine != "transformers":
            command = engine_command(args.engine, model_dir, system, args.host, args.port,
                                     Path(tempfile.mkdtemp(prefix=f"serve-{args.engine}-")))
    except (ModelPathError, UnverifiedModelError, TemplateError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if warning:
        print(warning, flush=True)
    print(f"system prompt: {system!r}", flush=True)
    if args.engine != "transformers":
        if shutil.which(command[0]) is None:
            print(f"error: {args.engine} is not installed here; install it on the GPU machine (pip install "
                  f"{args.engine}) or serve with --engine transformers. Its command: {' '.join(command)}",
                  file=sys.stderr)
            return 2
        print(" ".join(command), flush=True)
        os.execvp(command[0], command)  # the engine takes this process's place, so stopping it stops the server
    import uvicorn

    print(f"Serving {model_dir} at http://{args.host}:{args.port}/v1/chat/completions (Ctrl+C stops it)", flush=True)
    uvicorn.run(build_app(model_dir, system, args.max_new_tokens), host=args.host, port=args.port,
                log_level="warning")
    return 0
