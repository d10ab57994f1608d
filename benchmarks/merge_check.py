"""The whole-model merge check at a real model's size: how far a right merge's logits lie from what a right merge
computes (the bound), and what the check says of the cheapest ways around it.

    python benchmarks/merge_check.py --work /tmp/course-gpu      # after benchmarks/gpu_course.py (notebook 03)

Cases, each on a copy of WORK/final_model (weight files hard-linked, an edited one written anew):
as merged; config.json's rope_theta doubled; lm_head.weight removed; the base model posing as the merge.
Prints one table: case, verdict, max |logit diff| against the in-memory merge, the bound (2 x the dtype's rounding
noise), the adapter's own effect, seconds, and the first problem found.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def linked_copy(src: Path, dst: Path) -> Path:
    """dst with src's files hard-linked (no 3.8 GB copy); edit a file only after unlinking it (see rewrite)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            os.link(f, dst / f.name)
    return dst


def drop_tensor(folder: Path, name: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            if name not in h.keys():
                continue
            tensors = {k: h.get_tensor(k) for k in h.keys() if k != name}
        f.unlink()  # a hard link: write a new file, never into the shared one
        save_file(tensors, str(f), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].pop(name, None)
        index.unlink()
        index.write_text(json.dumps(data))


def rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.unlink()
    path.write_text(json.dumps(data))


def double_rope_theta(config: dict) -> None:
    holder = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else config
    holder["rope_theta"] = 2 * float(holder.get("rope_theta", 10000.0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/course-gpu")
    args = ap.parse_args(argv)

    from helpers.base_model import base_model_path
    from helpers.merge import verify_merge
    from helpers.paths import work as make_work
    from helpers.progress import print_table

    w = make_work(args.work, create=False)
    base = Path(base_model_path(w))
    rows = []
    with tempfile.TemporaryDirectory(dir=w.root) as tmp:
        cases = {"as merged": w.final_model}
        cases["rope_theta doubled"] = linked_copy(w.final_model, Path(tmp) / "rope")
        rewrite_json(cases["rope_theta doubled"] / "config.json", double_rope_theta)
        cases["lm_head.weight removed"] = linked_copy(w.final_model, Path(tmp) / "head")
        drop_tensor(cases["lm_head.weight removed"], "lm_head.weight")
        cases["the base as final_model"] = base
        for label, folder in cases.items():
            start = time.perf_counter()
            c = verify_merge(folder, base, w.adapter)
            rows.append((label, "passed" if c["passed"] else "FAILED", f"{c.get('max_abs_diff', float('nan')):.3g}",
                         f"{c.get('tolerance') or float('nan'):.3g}", f"{c.get('rounding_noise', 0):.3g}",
                         f"{c.get('adapter_effect_max_abs', float('nan')):.3g}", f"{time.perf_counter() - start:.1f}",
                         (c["problem"] or "–")[:110]))
            print("| " + " | ".join(rows[-1]) + " |", flush=True)
    print()
    print_table(["case", "verdict", "max |logit diff|", "bound", "rounding noise", "adapter effect", "seconds",
                 "first problem"], rows)
    shutil.rmtree(Path(tmp), ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
