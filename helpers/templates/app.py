"""The deployed chat demo: on first start it fetches the fine-tuned model from its git repository (with
git-lfs) into a cache folder, then serves the chat app (chat_app.py) on it.

Run locally with `streamlit run app.py`; the model repository is set in app_config.json or MODEL_REPO_URL, and the
system prompt the model was trained with in its `system` field (or MODEL_SYSTEM_PROMPT).
"""
import os
import sys
from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import chat_app  # noqa: E402
from fetch_model import (TOKEN_ENV, FetchError, fetch_model, fetched_commit, remote_commit,  # noqa: E402
                         settings)


@st.cache_data(ttl=60, show_spinner=False)
def newest_commit(url: str, revision: str) -> str | None:
    """The remote's commit, asked at most once a minute; a re-push is served from the next minute on."""
    return remote_commit(url, revision, token=os.environ.get(TOKEN_ENV))


@st.cache_resource(show_spinner="Fetching the model from its repository ...")
def model_dir(url: str, revision: str, cache_dir: str, commit: str | None) -> str:
    return str(fetch_model(url, cache_dir, revision, token=os.environ.get(TOKEN_ENV), commit=commit))


@st.cache_resource
def served() -> dict:
    return {}  # the commit whose weights chat_app has loaded, shared by every session


try:
    config = settings(HERE)
    newest = newest_commit(config["model_repo_url"], config["revision"])
    try:
        path = model_dir(config["model_repo_url"], config["revision"], config["cache_dir"], newest)
    except FetchError as e:  # the new commit could not be fetched: keep serving the copy we have, if any
        if newest is None:
            raise
        path = model_dir(config["model_repo_url"], config["revision"], config["cache_dir"], None)
        st.warning(f"Serving the cached model; the newer commit {(newest or '?')[:12]} could not be fetched: {e}")
except FetchError as e:
    st.error(str(e))
    st.stop()
commit = fetched_commit(path)
if served().get("commit") != commit:  # a new commit was fetched into the same folder: reload the weights
    chat_app.load.clear()
    served()["commit"] = commit
if config.get("title"):
    chat_app.TITLE = config["title"]
chat_app.render_app(path, system=config.get("system"))  # the prompt the model was trained with
st.caption(f"From `{config['model_repo_url']}` at {config['revision']}: serving commit {(commit or '?')[:12]}")
