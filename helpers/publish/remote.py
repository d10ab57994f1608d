"""The remote: its URL checked (no credential written into it, shown without secrets), the token and user name."""
from __future__ import annotations

import getpass
import os
import re
from urllib.parse import urlsplit, urlunsplit

TOKEN_ENV = "COURSE_HUB_TOKEN"  # the hub access token is read from here (or asked for, hidden)
USER_ENV = "COURSE_HUB_USER"  # the hub user name, when the URL does not say it


class PublishError(RuntimeError):
    """Publishing failed; the message says what went wrong and how to fix it."""


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


def _is_local(url: str) -> bool:
    return urlsplit(url).scheme in ("file", "") and not re.match(r"^[\w.-]+@[\w.-]+:", url)
