"""The upload through huggingface_hub's API: the alternative to a git push, for the Hugging Face hub or one like it."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .remote import TOKEN_ENV, PublishError, _check_url


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
