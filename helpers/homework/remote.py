"""The publish check: the remote, read back by the checker, holds this work's model repository and weights."""
from __future__ import annotations

from ..paths import Work
from ..results import read_results
from .verdict import Check, _first_line, _not_run


def _practice(remote: str) -> bool:
    from ..publish import remote_kind

    return remote_kind(remote)["transport"] == "local"


def check_publish(work: Work, required: bool, allow_practice_remote: bool = False) -> Check:
    """The remote, asked by the checker, holds the model repository byte for byte (its LFS weights fetched
    back), and those weights are final_model's. A local or file:// remote is practice, never a publication."""
    from ..fingerprint import folder_hashes
    from ..merge import first_names
    from ..publish import PublishError, hub_token, verify_push

    r = read_results(work, "06_publish") or {}
    push = r.get("push") if isinstance(r.get("push"), dict) else r
    remote = str(push.get("remote") or push.get("remote_url") or "")
    branch = str(push.get("branch") or "main")
    optional = "" if required else " (optional)"
    if not (work.model_repo / ".git").exists() or not remote:
        return Check("publish", "FAIL" if required else "SKIP",
                     _not_run("06_publish", work, f"the pushed repository {work.model_repo}") + optional)
    try:
        back = verify_push(work.model_repo, remote, token=hub_token(remote, prompt=False), branch=branch)
    except (PublishError, OSError, ValueError) as e:
        return Check("publish", "FAIL" if required else "SKIP", f"the remote {remote} cannot be read back: "
                                                                f"{_first_line(e)}{optional}")
    if not back["identical"]:
        return Check("publish", "FAIL", f"the remote {remote} does not hold this work's model repository "
                                        f"({first_names(back['differ'])} differ)")
    weights = {n: h for n, h in folder_hashes(work.final_model, cached=False).items() if n.endswith(".safetensors")}
    pushed = folder_hashes(work.model_repo, cached=False)
    stale = sorted(n for n, h in weights.items() if pushed.get(n) != h)
    if not weights or stale:
        return Check("publish", "FAIL", f"the pushed weights are not this work's final_model "
                                        f"({first_names(stale) or 'final_model has none'}); run notebook 06 again")
    if _practice(remote):
        why = f"practice remote, not published: {remote} holds the model ({back['files']} files, identical)"
        if required and not allow_practice_remote:
            return Check("publish", "FAIL", why + "; push to a model hub, or the teacher passes --allow-practice-remote")
        return Check("publish", "PASS" if required else "SKIP", why)
    return Check("publish", "PASS", f"{remote} holds this work's model repository ({back['files']} files, "
                                    "identical when cloned back, weights = final_model)")
