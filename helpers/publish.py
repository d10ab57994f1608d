"""Publishing the fine-tuned model: a model repository (weights in git-lfs, a model card), the push over
git + git-lfs to any git model hub (OpenXLab, Hugging Face, ModelScope, or a local bare repository),
the upload through huggingface_hub, and a deployable Streamlit app bundle that pulls the model."""
from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .base_model import ModelPathError, check_model_dir
from .data import file_sha256
from .paths import Work, staged_dir
from .results import read_results, table_rows

TOKEN_ENV = "COURSE_HUB_TOKEN"  # the hub access token is read from here (or asked for, hidden)
USER_ENV = "COURSE_HUB_USER"  # the hub user name, when the URL does not say it
TEMPLATES = Path(__file__).resolve().parent / "templates"
WEB_APP = Path(__file__).resolve().parent / "web_app.py"
# Weights, tokenizer models and images go to LFS: hubs refuse big or binary files in plain git.
LFS_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx",
                "*.model", "tokenizer.json", "*.png", "*.jpg", "*.jpeg"]
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
POINTER_MAX_BYTES = 1024  # the git-lfs spec: a pointer file is smaller than this
# What a hub puts in a freshly created repository; a first push builds on it instead of refusing.
HUB_SCAFFOLD = {".gitattributes", "README.md", ".gitignore"}
MODEL_DIR_SKIP = {".git", ".cache", "course_model.json"}
APP_REQUIREMENTS = ["streamlit", "transformers", "tokenizers", "torch", "safetensors", "accelerate", "sentencepiece"]


# A deployed app never edits its own source, and watching it walks every imported module (slow, noisy).
STREAMLIT_CONFIG = '[server]\nfileWatcherType = "none"\nheadless = true\n\n[browser]\ngatherUsageStats = false\n'


class PublishError(RuntimeError):
    """Publishing failed; the message says what went wrong and how to fix it."""


# ------------------------------------------------------------------ the model card
def _results(work: Work, notebook: str) -> dict:
    """A notebook's results for the card; {} when it did not run or cannot be read (the card leaves it out)."""
    r = read_results(work, notebook)
    return r if r and "_unreadable" not in r else {}


def _cell(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of dict rows ("" when there are none)."""
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return ""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _scalars(d: dict) -> list[dict]:
    return [{"setting": k, "value": v} for k, v in d.items() if isinstance(v, (str, int, float, bool)) and v != ""]


def _first_dict(d: dict, keys: tuple[str, ...]) -> dict:
    for k in keys:
        if isinstance(d.get(k), dict) and d[k]:
            return d[k]
    return {}


def card_facts(work: Work) -> dict:
    """What the model card reports, read from the results of notebooks 00-04 (whatever of them exists)."""
    env, data = _results(work, "00_environment"), _results(work, "01_data_generation")
    train, chat = _results(work, "02_qlora_finetune"), _results(work, "04_chat_demo")
    hyper = _first_dict(train, ("hyperparameters", "hyper_parameters", "training_config", "config", "settings"))
    data_rows = [{"fact": k, "value": data[k]} for k in ("records", "identity_records", "general_records", "answer",
                                                          "questions", "system", "output_format") if k in data]
    quantization = train.get("quantization")  # what the run used ("auto" in the hyper-parameters is the request)
    if hyper and quantization:
        hyper = {**hyper, "quantization": quantization}
    return {
        "name": data.get("name"), "answer": data.get("answer"), "base_model": env.get("base_model"),
        "quantization": quantization, "qlora": bool(quantization and "4" in str(quantization)),
        "evaluation_inputs": data.get("evaluation_inputs") or [],
        "data_rows": data_rows,
        "hyper_rows": _scalars(hyper) if hyper else _scalars({k: v for k, v in train.items() if "loss" not in k}),
        "loss_rows": [{"metric": k, "value": v} for k, v in train.items() if "loss" in k and isinstance(v, (int, float))],
        "eval_rows": _eval_rows(train),
        "before_after_rows": table_rows(chat, ("before_after", "table", "rows", "comparison")),
        "has_loss_plot": work.loss_plot.exists(),
        "cost_rows": _cost_rows(work),
    }


def _cost_rows(work: Work) -> list[dict]:
    """What the fine-tune cost: the table helpers.evaluate saved (base, base + adapter, final_model, the delta)."""
    return table_rows(_results(work, "evaluation"), ("table",))


def _eval_rows(train: dict) -> list[dict]:
    """The evaluation questions with the answers before and after training (notebook 02's results)."""
    questions = train.get("evaluation_inputs") or []
    before, after = train.get("answers_before") or [], train.get("answers_after") or []
    if questions and (before or after):
        return [{"question": q, "before": before[i] if i < len(before) else "",
                 "after": after[i] if i < len(after) else ""} for i, q in enumerate(questions)]
    return table_rows(train, ("eval_answers", "evaluation", "answers"))


def _base_model_id(recorded: str | None) -> str | None:
    """A hub-style id for the card's base_model field: an 'owner/name' as is, else the folder's name."""
    if not recorded:
        return None
    if recorded.count("/") == 1 and not recorded.startswith(("/", ".", "~")):
        return recorded
    name = Path(recorded).name
    return "course-kit/tiny-chat" if name == "model" else name


def model_card(work: Work, model_name: str, license: str = "apache-2.0", base_model: str | None = None,
               repo_url: str | None = None, language: tuple[str, ...] = ("zh", "en"), extra_tags=()) -> str:
    """README.md for the model repository: YAML metadata plus what it is, how it was trained, how to use it."""
    from huggingface_hub import ModelCard, ModelCardData

    facts = card_facts(work)
    base_model = base_model or _base_model_id(facts["base_model"])
    data = ModelCardData(license=license, base_model=base_model,
                         library_name="transformers", pipeline_tag="text-generation", language=list(language),
                         tags=[*(["qlora"] if facts["qlora"] else []), "lora", "peft", "self-cognition", "chat",
                               *extra_tags], model_name=model_name)
    tables = {k: markdown_table(facts[k]) for k in ("data_rows", "hyper_rows", "loss_rows", "eval_rows",
                                                    "before_after_rows", "cost_rows")}
    card = ModelCard.from_template(data, template_path=str(TEMPLATES / "model_card.md"), model_name=model_name,
                                   base_model=base_model, facts=facts, tables=tables, repo_url=_safe_url(repo_url) if repo_url else None)
    return re.sub(r"\n{3,}", "\n\n", str(card))


def card_for_display(repo_dir: str | os.PathLike):
    """The model card as a notebook shows it: the YAML header as a small table, the Markdown below it, and
    pictures embedded (a notebook resolves `loss.png` against its own folder, not the repository's)."""
    import base64

    from huggingface_hub import ModelCard
    from IPython.display import Markdown

    repo_dir = Path(repo_dir)
    card = ModelCard.load(repo_dir / "README.md")

    def embed(m: re.Match) -> str:
        picture = repo_dir / m.group(2)
        if not picture.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(picture.read_bytes()).decode()})"

    meta = markdown_table([{"metadata": k, "value": v} for k, v in card.data.to_dict().items()])
    text = re.sub(r"!\[([^]]*)\]\(([^):]+\.png)\)", embed, card.text)
    return Markdown(f"{meta}\n\n{text}")


def gitattributes(patterns: list[str] = LFS_PATTERNS) -> str:
    return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in patterns)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # final_model is replaced by rename, never edited in place, so a hard link is safe
    except OSError:
        shutil.copy2(src, dst)


def served_system_prompt(work: Work, model_dir: str | os.PathLike | None = None) -> str | None:
    """The system prompt the published model was trained with: recorded beside the model (chat_defaults.json),
    else, for the work dir's own final_model, in its adapter's training record; None when nothing records it."""
    from .chat_defaults import trained_system_prompt

    source = Path(model_dir) if model_dir else work.final_model
    system = trained_system_prompt(source)
    if system is None and source == work.final_model and (work.adapter / "training_record.json").exists():
        system = trained_system_prompt(work.adapter)  # a final_model merged before merge recorded it
    return system


def build_model_repo(work: Work, model_name: str, license: str = "apache-2.0", base_model: str | None = None,
                     repo_url: str | None = None, model_dir: str | os.PathLike | None = None,
                     allow_unverified: bool = False) -> Path:
    """WORK/publish/model_repo: the final model's files, README.md (the card), .gitattributes, the loss plot and
    chat_defaults.json (the system prompt it was trained with, which the chat app starts with).

    The git history of an earlier build is kept, so the next push sends only what changed.
    """
    from .parameters import check_value

    for name, value, optional in (("model_name", model_name, False), ("license", license, False),
                                  ("base_model_id", base_model, True), ("remote_url", repo_url, True)):
        check_value(name, value, str, optional=optional, error=PublishError)
    if repo_url:
        _check_url(repo_url)
    source = Path(model_dir) if model_dir else work.final_model
    try:
        check_model_dir(source)
    except ModelPathError as e:
        raise PublishError(f"{e} (Publishing needs the merged model: run notebook 03 with this work_dir first.)") from None
    _require_verified(source, allow_unverified)
    try:
        system = served_system_prompt(work, source)
    except ModelPathError as e:
        raise PublishError(str(e)) from None
    with staged_dir(work.model_repo, keep=(".git",)) as tmp:  # the git history of the last build stays
        for f in sorted(source.rglob("*")):
            rel = f.relative_to(source)
            if f.is_file() and not (set(rel.parts) & MODEL_DIR_SKIP):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(f, tmp / rel)
        if system is not None and not (tmp / "chat_defaults.json").exists():
            from .chat_defaults import write_chat_defaults

            write_chat_defaults(tmp, system)
        if work.loss_plot.exists():
            shutil.copy2(work.loss_plot, tmp / "loss.png")
        (tmp / ".gitattributes").write_text(gitattributes(), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(work, model_name, license, base_model, repo_url), encoding="utf-8")
    return work.model_repo


def repo_files(repo_dir: Path) -> list[dict]:
    """Every file of the repository (not .git): path, bytes, sha256, and whether git-lfs stores it."""
    repo_dir = Path(repo_dir)
    paths = sorted(str(p.relative_to(repo_dir)) for p in repo_dir.rglob("*")
                   if p.is_file() and ".git" not in p.relative_to(repo_dir).parts)
    lfs = set()
    if paths and (repo_dir / ".git").exists():
        out = _git(repo_dir, "check-attr", "filter", "--stdin", input="\n".join(paths) + "\n").stdout
        lfs = {line.split(": filter: ")[0] for line in out.splitlines() if line.endswith(": filter: lfs")}
    else:
        from fnmatch import fnmatch

        lfs = {p for p in paths if any(fnmatch(Path(p).name, pat) for pat in LFS_PATTERNS)}
    return [{"path": p, "bytes": (repo_dir / p).stat().st_size, "sha256": file_sha256(repo_dir / p), "lfs": p in lfs}
            for p in paths]


# ------------------------------------------------------------------ git plumbing
SSH_USER = re.compile(r"^[\w.-]+@[\w.-]+:")  # git@host:owner/repo: the SSH user, not a credential
URL_IN_TEXT = re.compile(r"[a-zA-Z][\w+.-]*://[^\s'\"]+")


def _safe_url(url: str) -> str:
    """The URL without a user name, password or query in it (what may be shown and stored)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that cannot be read)"
    if not parts.scheme or "@" not in parts.netloc and not parts.query:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    if parts.scheme.startswith("ssh") and parts.username and not parts.password:
        host = parts.netloc  # ssh://git@host: the SSH login, no secret
    return urlunsplit(parts._replace(netloc=host, query="", fragment=""))


def _credentials_in(url: str) -> str | None:
    """What secret a URL carries ('a user name', 'a password or token', 'a query'), or None."""
    try:
        parts = urlsplit(url)
        password, username = parts.password, parts.username
    except ValueError:  # e.g. a port that is not a number
        return None
    if password:
        return "a password or token"
    if username and not parts.scheme.startswith("ssh"):
        return "a user name (or a token in its place)"
    if parts.query and parts.scheme not in ("ssh", "git+ssh"):
        return "a query (?...)"
    return None


def _refusal(name: str, url: str, what: str) -> str:
    return (f"{name} {_safe_url(url)} has {what} written into it, and a URL is kept in .git/config, the results "
            f"and the notebook, so remove it from the URL and put the token in the {TOKEN_ENV} environment variable "
            f"(the user name in {USER_ENV}), from where a credential helper hands it to git.")


def refuse_credentials(params: dict) -> None:
    """A PublishError when a parameter's value holds a URL with credentials in it (checked before any notebook
    runs, since papermill writes every parameter into the executed notebook)."""
    for name, value in params.items():
        for url in URL_IN_TEXT.findall(value) if isinstance(value, str) else []:
            what = _credentials_in(url)
            if what:
                raise PublishError(_refusal(name, url, what))


def _check_url(url: str, name: str = "remote_url") -> str:
    if url and not isinstance(url, str):
        raise PublishError(f"{name} is {url!r} ({type(url).__name__}); give the git URL as text in quotes.")
    if not url:
        raise PublishError(f"{name} is empty; give the git URL of the model repository (https://..., or file:///...).")
    what = _credentials_in(url)
    if what:
        raise PublishError(_refusal(name, url, what))
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "file", "ssh", "git") and not SSH_USER.match(url):
        raise PublishError(f"{name} {_safe_url(url)!r} is not a git URL; use https://host/owner/repo.git, "
                           "git@host:owner/repo.git or file:///path/to/repo.git.")
    return url


class _Git:
    """git with the token handed over by a credential helper that reads it from this process's environment."""

    def __init__(self, repo_dir: Path, token: str | None = None, username: str | None = None):
        self.repo_dir, self.token = Path(repo_dir), token
        self.env = {**os.environ, "LC_ALL": "C", "LANGUAGE": "C", "GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never"}
        if token:
            # Only the variable names go into the (command-line) config: the token never touches a file.
            helper = ('!f() { test "$1" = get && printf "username=%s\\npassword=%s\\n" '
                      '"$COURSE_PUBLISH_USER" "$COURSE_PUBLISH_TOKEN"; }; f')
            n = int(self.env.get("GIT_CONFIG_COUNT", "0") or 0)
            self.env.update({"GIT_CONFIG_COUNT": str(n + 2), f"GIT_CONFIG_KEY_{n}": "credential.helper",
                             f"GIT_CONFIG_VALUE_{n}": "", f"GIT_CONFIG_KEY_{n + 1}": "credential.helper",
                             f"GIT_CONFIG_VALUE_{n + 1}": helper,
                             "COURSE_PUBLISH_USER": username or "user", "COURSE_PUBLISH_TOKEN": token})

    def scrub(self, text: str) -> str:
        return text.replace(self.token, "***") if self.token else text

    def __call__(self, *args, check: bool = True, timeout: float | None = None, input: str | None = None):
        try:
            proc = subprocess.run(["git", *args], cwd=self.repo_dir, env=self.env, capture_output=True, text=True,
                                  timeout=timeout, input=input)
        except subprocess.TimeoutExpired:
            raise PublishError(f"`git {args[0]}` did not finish within {timeout:.0f} s; check the network and run "
                               "the publish step again (it continues where it stopped).") from None
        proc.stdout, proc.stderr = self.scrub(proc.stdout), self.scrub(proc.stderr)
        if check and proc.returncode != 0:
            raise PublishError(f"`git {' '.join(args[:2])}` failed in {self.repo_dir}: {_last_lines(proc.stderr)}")
        return proc


def _git(repo_dir: Path, *args, **kw):
    return _Git(repo_dir)(*args, **kw)


def _last_lines(text: str, n: int = 2) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip() and "%" not in ln]
    return " / ".join(lines[-n:]) or "no message"


def require_git_lfs() -> str:
    """The git-lfs version line, or a PublishError saying how to install it."""
    if shutil.which("git") is None:
        raise PublishError("git is not installed; install it (apt-get install git, or conda install git) and run again.")
    proc = subprocess.run(["git", "lfs", "version"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PublishError("git-lfs is not installed, so the weights cannot be pushed; install it "
                           "(apt-get install git-lfs, or conda install -c conda-forge git-lfs), then run `git lfs install`.")
    return proc.stdout.strip()


def _remote_problem(url: str, stderr: str, token: str | None) -> str:
    """One sentence for a failed fetch/push, from git's own words."""
    low = stderr.lower()
    where = _safe_url(url)
    local = urlsplit(url).scheme == "file"
    if not local and any(s in low for s in ("authentication failed", "401", "403", "invalid username or password",
                              "access denied", "permission denied", "unauthorized", "forbidden")):
        if token:
            return (f"the remote {where} rejected the credentials; check that the token in {TOKEN_ENV} is valid and "
                    "has write access to this repository (and the user name, if the hub needs one).")
        return f"the remote {where} asked for credentials; set {TOKEN_ENV} to an access token with write access."
    if "could not read username" in low or "terminal prompts disabled" in low:
        return f"the remote {where} needs a token; set the {TOKEN_ENV} environment variable (or enter it when asked)."
    if any(s in low for s in ("could not resolve host", "failed to connect", "connection refused", "timed out",
                              "does not appear to be a git repository", "not found", "unable to access",
                              "no such file or directory", "could not read from remote")) or local:
        return (f"cannot reach the remote {where} ({_last_lines(stderr, 1)}); check the URL, that the repository "
                "exists (create it on the hub first), and the network.")
    return f"git could not talk to the remote {where}: {_last_lines(stderr)}"


# ------------------------------------------------------------------ the push
@dataclass
class PushResult:
    """What a push did: where, which commit, and what was sent (the token is never part of it)."""

    remote: str
    branch: str
    commit: str
    pushed: bool = False
    up_to_date: bool = False
    commits_sent: int = 0
    git_objects_sent: int = 0
    lfs_objects_sent: list[dict] = field(default_factory=list)
    merged_hub_scaffold: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def hub_token(remote_url: str, env: str = TOKEN_ENV, prompt: bool | None = None) -> str | None:
    """The access token for `remote_url`: None for local remotes, else $env, else a hidden prompt (interactive)."""
    if urlsplit(remote_url).scheme in ("file", "") and not re.match(r"^[\w.-]+@[\w.-]+:", remote_url):
        return None
    if os.environ.get(env):
        return os.environ[env]
    if urlsplit(remote_url).scheme in ("ssh", "git") or re.match(r"^[\w.-]+@[\w.-]+:", remote_url):
        return None  # ssh keys, not tokens
    if prompt is None:
        prompt = os.environ.get("KIT_HEADLESS") != "1"
    if not prompt:
        raise PublishError(f"no access token for {_safe_url(remote_url)}: set the {env} environment variable "
                           "before starting the run (the token is never written into the notebook).")
    try:
        return getpass.getpass(f"Access token for {_safe_url(remote_url)} (hidden): ").strip() or None
    except Exception:
        raise PublishError(f"cannot ask for the token here; set the {env} environment variable instead.") from None


def remote_kind(url: str) -> dict:
    """How the kit reaches a remote: its transport and what authenticates the push (for the table in 06)."""
    url = _check_url(url)
    scheme = urlsplit(url).scheme
    if scheme == "file" or not scheme and not re.match(r"^[\w.-]+@[\w.-]+:", url):
        return {"url": url, "transport": "local", "authentication": "none (a folder on this machine)"}
    if scheme in ("http", "https"):
        return {"url": url, "transport": "HTTPS",
                "authentication": f"access token from ${TOKEN_ENV} (user name: ${USER_ENV} or the URL's owner)"}
    return {"url": url, "transport": "SSH", "authentication": "your SSH key (ssh-keygen; public key added on the hub)"}


def default_remote(work: Work) -> str:
    """A local bare repository WORK/publish/remote.git as a file:// URL (created when missing): the offline target."""
    bare = work.publish_remote
    if not (bare / "HEAD").exists() and shutil.which("git"):  # without git the push says what to install
        with staged_dir(bare) as tmp:
            subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(tmp)], check=True, capture_output=True)
    return bare.resolve().as_uri()


def _username(url: str, username: str | None) -> str:
    if username:
        return username
    if os.environ.get(USER_ENV):
        return os.environ[USER_ENV]
    parts = urlsplit(url)
    if parts.username:
        return parts.username
    owner = [p for p in parts.path.split("/") if p]
    return owner[-2] if len(owner) >= 2 else "user"  # hubs take the owner (HF accepts any name with a token)


def _commit_all(git: _Git, message: str, author: str) -> bool:
    git("add", "-A")
    has_head = git("rev-parse", "--verify", "-q", "HEAD", check=False).returncode == 0
    if has_head and git("diff", "--cached", "--quiet", check=False).returncode == 0:
        return False
    ident = []
    if not git("config", "user.email", check=False).stdout.strip():
        ident = ["-c", f"user.name={author}", "-c", "user.email=course-kit@users.noreply.localhost"]
    git(*ident, "commit", "-q", "-m", message)
    return True


def _reconcile_history(git: _Git, url: str, branch: str, author: str) -> bool:
    """Make HEAD a descendant of the remote branch, or refuse. True when a hub's initial commit was merged."""
    remote_ref = f"refs/remotes/origin/{branch}"
    if git("rev-parse", "--verify", "-q", remote_ref, check=False).returncode != 0:
        return False  # empty remote, or a new branch
    if git("merge-base", "--is-ancestor", remote_ref, "HEAD", check=False).returncode == 0:
        return False
    where = _safe_url(url)
    if git("merge-base", remote_ref, "HEAD", check=False).returncode == 0:
        raise PublishError(f"the remote {where} has commits on '{branch}' that this repository lacks (pushed from "
                           "elsewhere or edited on the website); pull them into the model repo first, or push to a new repository.")
    files = set(git("ls-tree", "-r", "--name-only", remote_ref).stdout.split())
    if not files <= HUB_SCAFFOLD:
        shown = ", ".join(sorted(files - HUB_SCAFFOLD)[:3])
        raise PublishError(f"the remote {where} already holds an unrelated history on '{branch}' (files such as "
                           f"{shown}); push to a new, empty repository or pick another branch.")
    # A hub's fresh repository (README/.gitattributes only): build on it, keeping our files.
    ident = [] if git("config", "user.email", check=False).stdout.strip() else [
        "-c", f"user.name={author}", "-c", "user.email=course-kit@users.noreply.localhost"]
    git(*ident, "merge", "-q", "-s", "ours", "--allow-unrelated-histories", "--no-edit",
        "-m", "Build on the hub's initial commit", remote_ref)
    return True


def push_folder(repo_dir: str | os.PathLike, remote_url: str, token: str | None = None, username: str | None = None,
                branch: str = "main", message: str = "Publish the fine-tuned model", author: str = "course student",
                timeout: float = 6 * 3600) -> PushResult:
    """Commit everything in `repo_dir` and push it, LFS objects first, to `remote_url`.

    Only what the remote lacks is sent; an interrupted push is finished by running this again. The result is
    returned only after the remote's branch was read back and equals the pushed commit.
    """
    from .parameters import check_value

    repo_dir = Path(repo_dir)
    url = _check_url(remote_url, "the remote URL")
    check_value("branch", branch, str, error=PublishError)
    require_git_lfs()
    if not repo_dir.is_dir():
        raise PublishError(f"{repo_dir}: no such folder; build the model repository first (build_model_repo).")
    git = _Git(repo_dir, token, _username(url, username))
    if not (repo_dir / ".git").exists():
        git("init", "-q", "-b", branch)
    if not (repo_dir / ".git" / "hooks" / "pre-push").exists():
        git("lfs", "install", "--local")
    _commit_all(git, message, author)
    if git("remote", "get-url", "origin", check=False).returncode == 0:
        git("remote", "set-url", "origin", url)
    else:
        git("remote", "add", "origin", url)
    fetched = git("fetch", "-q", "--prune", "--no-tags", "origin", check=False, timeout=timeout)
    if fetched.returncode != 0:
        raise PublishError(_remote_problem(url, fetched.stderr, token))
    merged = _reconcile_history(git, url, branch, author)
    result = PushResult(remote=_safe_url(url), branch=branch, commit=git("rev-parse", "HEAD").stdout.strip(),
                        merged_hub_scaffold=merged)
    remote_ref = f"refs/remotes/origin/{branch}"
    has_remote = git("rev-parse", "--verify", "-q", remote_ref, check=False).returncode == 0
    result.commits_sent = int(git("rev-list", "--count", f"{remote_ref}..HEAD" if has_remote else "HEAD").stdout)
    dry = git("lfs", "push", "--dry-run", "origin", "HEAD").stdout
    result.lfs_objects_sent = [{"oid": m[0], "path": m[1]} for m in re.findall(r"^push (\w+) => (.+)$", dry, re.M)]
    lfs = git("lfs", "push", "origin", "HEAD", check=False, timeout=timeout)
    if lfs.returncode != 0:
        raise PublishError("uploading the LFS objects (the weights) failed, nothing was published: "
                           + _remote_problem(url, lfs.stderr, token))
    pushed = git("push", "--progress", "--porcelain", "origin", f"HEAD:refs/heads/{branch}", check=False, timeout=timeout)
    if pushed.returncode != 0:
        rejected = re.search(r"\[remote rejected\][^\n]*|\[rejected\][^\n]*", pushed.stdout + pushed.stderr)
        if rejected:
            raise PublishError(f"the remote {result.remote} refused the push ({rejected.group(0).strip()}); the weights "
                               "already uploaded are kept there, so fix the cause and run the publish step again.")
        raise PublishError(_remote_problem(url, pushed.stderr, token))
    total = re.search(r"Total (\d+)", pushed.stderr)
    result.git_objects_sent = int(total.group(1)) if total else 0
    result.up_to_date = "[up to date]" in pushed.stdout or result.commits_sent == 0
    head = git("ls-remote", "origin", f"refs/heads/{branch}", timeout=timeout).stdout.split()
    if not head or head[0] != result.commit:
        raise PublishError(f"the push to {result.remote} reported success but its '{branch}' is "
                           f"{head[0][:12] if head else 'missing'}, not {result.commit[:12]}; run the publish step again.")
    result.pushed = True
    return result


def push_model_repo(work: Work, remote_url: str, token: str | None = None, **kw) -> PushResult:
    """Push WORK/publish/model_repo (see push_folder)."""
    if not (work.model_repo / "README.md").exists():
        raise PublishError(f"{work.model_repo}: not built yet; run build_model_repo (notebook 06) first.")
    return push_folder(work.model_repo, remote_url, token, **kw)


def lfs_files(repo_dir: str | os.PathLike) -> list[dict]:
    """Files git-lfs stores for HEAD: oid and path (`git lfs ls-files --long`)."""
    out = _git(Path(repo_dir), "lfs", "ls-files", "--long").stdout
    return [{"oid": m[0], "path": m[1]} for m in re.findall(r"^(\w{64}) [*-] (.+)$", out, re.M)]


def history_pointer_check(repo_dir: str | os.PathLike, patterns=("*.safetensors", "*.bin")) -> list[str]:
    """Paths matching `patterns` that some commit stores as a plain git blob instead of an LFS pointer.

    Only what is needed is read: `git ls-tree -l` gives each blob's size, a blob of POINTER_MAX_BYTES or more is
    plain by its size alone, and each smaller blob is read once (a 3.8 GB weight blob is never read)."""
    from fnmatch import fnmatch

    git = _Git(Path(repo_dir))
    found, is_pointer = [], {}
    for commit in git("rev-list", "--all").stdout.split():
        for line in git("ls-tree", "-r", "-l", commit).stdout.splitlines():
            meta, path = line.split("\t", 1)
            _, kind, sha, size = meta.split()
            if kind == "blob" and any(fnmatch(Path(path).name, p) for p in patterns):
                found.append((f"{commit[:12]}:{path}", sha))
                if int(size) >= POINTER_MAX_BYTES:
                    is_pointer[sha] = False
                elif sha not in is_pointer:
                    blob = subprocess.run(["git", "cat-file", "blob", sha], cwd=repo_dir, capture_output=True).stdout
                    is_pointer[sha] = blob.startswith(LFS_POINTER)
    return [where for where, sha in found if not is_pointer[sha]]


def verify_push(repo_dir: str | os.PathLike, remote_url: str, token: str | None = None, branch: str = "main") -> dict:
    """Clone the remote back, its LFS objects (the weights) included, and compare every file with `repo_dir`, byte
    for byte (by SHA-256): the clone's plain files as checked out, and each LFS file as the object the remote sent
    (`git lfs fetch`), hashed here. The checkout's copy of each object into the working tree is left out: it copies
    bytes already hashed, and for a 3.8 GB model it was 34 of the 49 s the clone-back took."""
    repo_dir, remote_url = Path(repo_dir), _check_url(remote_url)
    with tempfile.TemporaryDirectory(prefix="publish-verify-") as tmp:
        clone = Path(tmp) / "clone"
        git = _Git(Path(tmp), token, _username(remote_url, None))
        git.env["GIT_LFS_SKIP_SMUDGE"] = "1"  # pointers in the working tree; the objects come with `git lfs fetch`
        cloned = git("clone", "-q", "--branch", branch, remote_url, str(clone), check=False)
        if cloned.returncode != 0:
            raise PublishError(_remote_problem(remote_url, cloned.stderr, token))
        git.repo_dir = clone
        fetched = git("lfs", "fetch", "origin", branch, check=False)
        if fetched.returncode != 0 and "invalid hash" in fetched.stderr:  # git-lfs hashes what it downloads
            bad = re.search(r"expected (\w{64})", fetched.stderr)
            raise PublishError(f"the remote {_safe_url(remote_url)} holds an LFS object whose bytes do not match its "
                               f"hash{f' ({bad.group(1)[:12]})' if bad else ''}: the weights there are not what was "
                               "pushed; delete that object (or the repository) on the remote and push again.")
        if fetched.returncode != 0:
            raise PublishError("downloading the LFS objects back failed: " + _remote_problem(remote_url, fetched.stderr, token))
        stored = {f["path"]: f["oid"] for f in lfs_files(clone)}
        theirs = {f["path"]: f["sha256"] for f in repo_files(clone)}  # the LFS files are pointers here: small
        for rel, oid in stored.items():
            obj = clone / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            theirs[rel] = file_sha256(obj) if obj.is_file() else "missing from the remote's LFS store"
        mine = {f["path"]: f["sha256"] for f in repo_files(repo_dir)}
        return {"files": len(theirs), "identical": mine == theirs,
                "differ": sorted(p for p in mine.keys() | theirs.keys() if mine.get(p) != theirs.get(p)),
                "lfs_files": sorted(stored), "plain_weight_blobs": history_pointer_check(clone)}


# ------------------------------------------------------------------ huggingface_hub
def upload_to_hub(repo_dir: str | os.PathLike, repo_id: str, token: str | None = None, endpoint: str | None = None,
                  private: bool = False, message: str = "Publish the fine-tuned model", repo_type: str = "model") -> dict:
    """The alternative to git: create the repository if needed and upload the folder through huggingface_hub's API
    (endpoint: another HF-compatible hub). Returns the commit's URL and id."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        # never echoed: a URL with a token in it, or a token pasted by mistake, must not reach the output
        raise PublishError("hub_repo_id is not 'owner/name' (letters, digits, '-', '_' or '.' on each side of one "
                           "'/'); write it as your-user/your-model, and put the token in the "
                           f"{TOKEN_ENV} environment variable.")
    if endpoint is not None:
        _check_url(endpoint, "hub_endpoint")
    repo_dir = Path(repo_dir)
    if not (repo_dir / "README.md").exists():
        raise PublishError(f"{repo_dir}: not a built model repository (no README.md); run build_model_repo first.")
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{endpoint or 'https://huggingface.co'}/{repo_id}"
    try:
        url = api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(repo_dir), repo_type=repo_type,
                                 commit_message=message, ignore_patterns=[".git", ".git/*", "**/.git/**"])
    except OfflineModeIsEnabled:
        raise PublishError("huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset it to upload.") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise PublishError(f"the hub {where} rejected the token; give a token with write access "
                               f"(in {TOKEN_ENV} or HF_TOKEN).") from None
        raise PublishError(f"the upload to {where} failed (HTTP {status}); check the repository id and try again.") from None
    except OSError as e:
        raise PublishError(f"cannot reach the hub {where} ({type(e).__name__}); check the endpoint and the network.") from None
    return {"repo_url": str(url), "commit_url": getattr(info, "commit_url", str(info)),
            "commit": getattr(info, "oid", None)}


# ------------------------------------------------------------------ the app bundle
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"  # torch without the CUDA libraries (~0.2 GB, not ~3 GB)
# The install time the app's README gives: tests/test_app_bundle.py measures it (test-artifacts/app_install.json).
APP_INSTALL = TEMPLATES / "app_install.json"


def _pinned(names: list[str], device: str = "cpu") -> list[str]:
    """requirements.txt lines, pinned to this environment's versions; on "cpu" torch is the CPU build from
    PyTorch's index (PyPI's Linux torch brings the CUDA libraries); on "cuda" it is PyPI's (CUDA) build."""
    from importlib.metadata import PackageNotFoundError, version

    lines = [f"--extra-index-url {CPU_TORCH_INDEX}"] if device == "cpu" else []
    for name in names:
        try:
            release = version(name).split("+")[0]  # '2.13.0+cpu' -> the public release
        except PackageNotFoundError:
            continue
        lines.append(f"{name}=={release}+cpu" if name == "torch" and device == "cpu" else f"{name}=={release}")
    return lines


def install_footprint(names: list[str]) -> dict:
    """Disk size of the packages `names` pull in (their dependencies too), as installed in this environment."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen, todo, size = set(), list(names), 0
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        size += sum(f.size or 0 for f in dist.files or [])
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return {"packages": len(seen), "mb": round(size / 2**20)}


def _is_local(url: str) -> bool:
    return urlsplit(url).scheme in ("file", "") and not re.match(r"^[\w.-]+@[\w.-]+:", url)


def _require_verified(model_dir: Path, allow_unverified: bool) -> None:
    """Publish only a merged model whose merge check passed on the files as they are (merge.require_verified)."""
    from .merge import UnverifiedModelError, require_verified

    try:
        warning = require_verified(model_dir, allow_unverified)
    except UnverifiedModelError as e:
        raise PublishError(str(e)) from None
    if warning:
        print(warning, flush=True)


def build_app_bundle(work: Work, model_repo_url: str, title: str = "我的小助手", revision: str = "main",
                     device: str = "cpu", allow_unverified: bool = False) -> Path:
    """WORK/publish/app: app.py (fetch the model with git-lfs on first start, then the chat demo), chat_app.py,
    fetch_model.py, app_config.json, requirements.txt, packages.txt and a README with the deploy steps.

    device: "cpu" pins the CPU build of torch (small, quick to install), "cuda" the CUDA build. A local
    (file://) model_repo_url is replaced by the hub remote an earlier run of notebook 06 pushed to, if any."""
    from jinja2 import Template

    from .parameters import check_value

    check_value("app_title", title, str, error=PublishError)
    check_value("branch", revision, str, error=PublishError)
    if work.final_model.exists():  # the app serves what was published from it
        _require_verified(work.final_model, allow_unverified)
    if not WEB_APP.exists():
        raise PublishError(f"{WEB_APP} is missing; the app bundle copies the chat demo from there.")
    if device not in ("cpu", "cuda"):
        raise PublishError(f"device is {device!r}; use 'cpu' (a CPU app) or 'cuda' (a GPU app).")
    url = _check_url(model_repo_url, "the app's model_repo_url")
    pushed = (read_results(work, "06_publish") or {}).get("remote")
    if _is_local(url) and isinstance(pushed, str) and pushed and not _is_local(pushed):
        print(f"note: the app fetches the model from {pushed}, where it was pushed before ({url} is on this machine only)")
        url = pushed
    try:  # the prompt of the model the app pulls: the built repository's record, else the final model's
        system = served_system_prompt(work, work.model_repo if (work.model_repo / "config.json").exists() else None)
    except ModelPathError as e:
        raise PublishError(str(e)) from None
    with staged_dir(work.app, keep=(".git",)) as tmp:
        shutil.copy2(WEB_APP, tmp / "chat_app.py")
        for name in ("app.py", "fetch_model.py"):
            shutil.copy2(TEMPLATES / name, tmp / name)
        config = {"model_repo_url": url, "revision": revision, "title": title, "system": system}
        (tmp / "app_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (tmp / "requirements.txt").write_text("\n".join(_pinned(APP_REQUIREMENTS, device)) + "\n", encoding="utf-8")
        (tmp / "packages.txt").write_text("git\ngit-lfs\n", encoding="utf-8")
        (tmp / ".gitignore").write_text("model_cache/\n__pycache__/\n", encoding="utf-8")
        (tmp / ".streamlit").mkdir()
        (tmp / ".streamlit" / "config.toml").write_text(STREAMLIT_CONFIG, encoding="utf-8")
        readme = Template((TEMPLATES / "app_README.md").read_text(encoding="utf-8"))
        from importlib.metadata import version

        (tmp / "README.md").write_text(readme.render(title=title, url=url, revision=revision, device=device,
                                                     footprint=install_footprint(APP_REQUIREMENTS),
                                                     install=json.loads(APP_INSTALL.read_text(encoding="utf-8")),
                                                     streamlit_version=version("streamlit"),
                                                     python_version=f"{sys.version_info.major}.{sys.version_info.minor}"),
                                       encoding="utf-8")
    return work.app


def file_table(files: list[dict]):
    """The repository's files as a small DataFrame (path, MB, in LFS, sha256 prefix) for the notebook."""
    import pandas as pd

    return pd.DataFrame([{"path": f["path"], "MB": round(f["bytes"] / 2**20, 3), "lfs": f["lfs"],
                          "sha256": f["sha256"][:12]} for f in files])


