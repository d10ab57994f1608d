"""The deployed chat demo: on first start it fetches the fine-tuned model from its git repository (with
git-lfs) into a cache folder, then serves the chat app (chat_app.py) on it.

Run locally with `streamlit run app.py`; the model repository is set in app_config.json or MODEL_REPO_URL.
"""
import os
import sys
from pathlib import Path

import streamlit as st

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import chat_app  # noqa: E402
from fetch_model import TOKEN_ENV, FetchError, fetch_model, fetched_commit, settings  # noqa: E402


@st.cache_resource(show_spinner="Fetching the model from its repository (first start only) ...")
def model_dir(url: str, revision: str, cache_dir: str) -> str:
    return str(fetch_model(url, cache_dir, revision, token=os.environ.get(TOKEN_ENV)))


try:
    config = settings(HERE)
    path = model_dir(config["model_repo_url"], config["revision"], config["cache_dir"])
except FetchError as e:
    st.error(str(e))
    st.stop()
if config.get("title"):
    chat_app.TITLE = config["title"]
chat_app.render_app(path)
st.caption(f"From `{config['model_repo_url']}` at {config['revision']} (commit {(fetched_commit(path) or '?')[:12]})")
