"""Publishing the fine-tuned model (notebook 06): a model repository (weights in git-lfs, a model card), the push over
git + git-lfs to any git model hub (OpenXLab, Hugging Face, ModelScope, or a local bare repository), the upload
through huggingface_hub, and a deployable Streamlit app bundle that pulls the model.

Read it in this order:
- remote.py      PublishError; the remote's URL checked (no credential in it), the token and user name, remote_kind
- git.py         git and git-lfs as subprocesses: the token through a credential helper, failures in one sentence
- card.py        the model card (README.md) from the results of notebooks 00-04, and its notebook view
- model_repo.py  build_model_repo: the verified final model's files, the card, .gitattributes; repo_files
- push.py        push_folder / push_model_repo: commit, LFS objects first, then git, read back; default_remote
- verify.py      verify_push: the remote cloned back and hashed; history_pointer_check
- hub.py         upload_to_hub: the same folder through huggingface_hub's API
- app.py         build_app_bundle: the Streamlit app that fetches the published model

Notebooks say `from helpers.publish import build_model_repo, push_model_repo`; the names below are its public
surface. Every file is light (huggingface_hub, pandas and jinja2 are imported inside the functions that use them).
"""
from __future__ import annotations

from ..data import file_sha256
from .app import (APP_INSTALL, APP_REQUIREMENTS, CPU_TORCH_INDEX, STREAMLIT_CONFIG, WEB_APP, build_app_bundle,
                  install_footprint)
from .card import TEMPLATES, card_facts, card_for_display, markdown_table, model_card
from .git import require_git_lfs
from .hub import upload_to_hub
from .model_repo import (LFS_PATTERNS, MODEL_DIR_SKIP, build_model_repo, file_table, gitattributes, repo_files,
                         served_system_prompt)
from .push import HUB_SCAFFOLD, PushResult, default_remote, push_folder, push_model_repo
from .remote import (SSH_USER, TOKEN_ENV, URL_IN_TEXT, USER_ENV, PublishError, hub_token, refuse_credentials,
                     remote_kind)
from .verify import LFS_POINTER, POINTER_MAX_BYTES, history_pointer_check, lfs_files, verify_push

__all__ = ["file_sha256", "APP_INSTALL", "APP_REQUIREMENTS", "CPU_TORCH_INDEX", "STREAMLIT_CONFIG", "WEB_APP",
           "build_app_bundle", "install_footprint", "TEMPLATES", "card_facts", "card_for_display", "markdown_table",
           "model_card", "require_git_lfs", "upload_to_hub", "LFS_PATTERNS", "MODEL_DIR_SKIP", "build_model_repo",
           "file_table", "gitattributes", "repo_files", "served_system_prompt", "HUB_SCAFFOLD", "PushResult",
           "default_remote", "push_folder", "push_model_repo", "SSH_USER", "TOKEN_ENV", "URL_IN_TEXT", "USER_ENV",
           "PublishError", "hub_token", "refuse_credentials", "remote_kind", "LFS_POINTER", "POINTER_MAX_BYTES",
           "history_pointer_check", "lfs_files", "verify_push"]
