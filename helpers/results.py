"""Each notebook's key results, as WORK/results/NN_<name>.json (what tests and the report read)."""
from __future__ import annotations

import json

from .data import atomic_write_text
from .paths import Work


def save_results(work: Work, notebook: str, results: dict) -> dict:
    """Write WORK/results/<notebook>.json atomically and return the dict."""
    atomic_write_text(work.result(notebook), json.dumps(results, ensure_ascii=False, indent=1, default=str) + "\n")
    return results


def load_results(work: Work, notebook: str) -> dict:
    path = work.result(notebook)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not written yet; run notebook {notebook} with this work_dir first.")
    return json.loads(path.read_text(encoding="utf-8"))


def read_results(work: Work, notebook: str) -> dict | None:
    """A notebook's results for reports and checks: None when it has not run, {"_unreadable": why} when the
    file is there but cannot be read, so a broken file is reported rather than raised."""
    path = work.result(notebook)
    if not path.exists():
        return None
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return {"_unreadable": f"{path.name} could not be read ({type(e).__name__})"}
    return loaded if isinstance(loaded, dict) else {"_unreadable": f"{path.name} is not a JSON object"}


def table_rows(results: dict, keys: tuple[str, ...]) -> list[dict]:
    """The first table found under one of `keys`, as row dicts (from a list of rows or a dict of columns)."""
    for key in keys:
        value = results.get(key)
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            return value
        if isinstance(value, dict) and value and all(isinstance(c, list) for c in value.values()):
            n = max(len(c) for c in value.values())
            return [{k: (c[i] if i < len(c) else "") for k, c in value.items()} for i in range(n)]
    return []
