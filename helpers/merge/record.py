"""The verification record a merge writes into final_model, and the check every later reader makes of it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .checks import _read_json, first_names

VERIFICATION_FILE = "verification.json"  # written into final_model by merge(): what was checked, and the files' hashes


class UnverifiedModelError(ValueError):
    """A final_model without a passed verification record, or whose files changed since it was verified."""


def write_verification(model_dir: Path, check: dict, base_model: Path, adapter: Path) -> dict:
    """Record in `model_dir` that it was verified against base + adapter, with the hashes of what was verified."""
    from ..data import atomic_write_text
    from ..fingerprint import folder_hashes, folder_sha256

    record = {"passed": bool(check["passed"]), "problem": check.get("problem", ""),
              "base_model": str(base_model), "base_model_sha256": folder_sha256(base_model),
              "adapter": str(adapter), "adapter_sha256": folder_sha256(adapter),
              "dtype": check.get("dtype"), "device": check.get("device"),
              "max_abs_diff": check.get("max_abs_diff"), "bound": check.get("tolerance"),
              "rounding_noise": check.get("rounding_noise"), "max_ulps": (check.get("weights") or {}).get("max_ulps"),
              "files": folder_hashes(model_dir)}
    atomic_write_text(Path(model_dir) / VERIFICATION_FILE, json.dumps(record, indent=1, default=str) + "\n")
    return record


def needs_verification(model_dir: str | os.PathLike) -> bool:
    """A merged chat model: a folder with a verification record, or a work dir's final_model (not the VLM's)."""
    model_dir = Path(model_dir)
    if (model_dir / VERIFICATION_FILE).exists():
        return True
    if model_dir.name != "final_model" or model_dir.parent.name == "vlm":
        return False
    return "vision_config" not in _read_json(model_dir / "config.json")


def verification_problem(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None) -> str:
    """'' when `model_dir` carries a passed verification record that matches its files (and, given `adapter`, was
    merged from that adapter as it is now); else one sentence."""
    from ..fingerprint import folder_hashes, folder_sha256

    model_dir = Path(model_dir)
    record_file = model_dir / VERIFICATION_FILE
    if not record_file.exists():
        return (f"{model_dir} has no verification record ({VERIFICATION_FILE}): it was not made by notebook 03's "
                "merge, or that merge was not checked; run notebook 03 again")
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        recorded = dict(record["files"])
    except (ValueError, KeyError, TypeError):
        return f"{record_file} cannot be read; run notebook 03 again"
    if not record.get("passed"):
        return f"{model_dir} failed its merge check ({record.get('problem') or 'see notebook 03'}); run notebook 03 again"
    now = folder_hashes(model_dir)
    changed = sorted(n for n in set(now) | set(recorded) if now.get(n) != recorded.get(n))
    if changed:
        return f"{model_dir}: {first_names(changed)} changed since the merge was verified; run notebook 03 again"
    if adapter is not None and Path(adapter).is_dir() and record.get("adapter_sha256") != folder_sha256(adapter):
        return (f"{model_dir} was merged from another adapter than {adapter} holds now (it was trained or imported "
                "again after notebook 03 ran), so the two would not answer alike; run notebook 03 again")
    return ""


def require_verified(model_dir: str | os.PathLike, allow_unverified: bool = False,
                     adapter: str | os.PathLike | None = None) -> str:
    """Refuse a merged model whose verification is missing, failed or out of date (UnverifiedModelError, one
    sentence); given `adapter` (what the reader shows beside the merged model), also one merged from another
    adapter. allow_unverified (a teacher's experiment): returns the warning to show with every output instead.
    Returns '' for a verified model and for folders that are not merged models (a base model)."""
    if not needs_verification(model_dir):
        return ""
    problem = verification_problem(model_dir, adapter)
    if problem and not allow_unverified:
        raise UnverifiedModelError(problem + " (or pass --unverified / allow_unverified=True for an experiment).")
    return f"UNVERIFIED MODEL: {problem}" if problem else ""
