"""Notebook 06's publishing steps at a real model's size, timed step by step (CPU and disk work: no GPU needed).

A work directory whose final model holds one weights file of --gb GB (random bytes in a valid safetensors file;
the tiny model's config and tokenizer beside it), then what notebook 06 runs, in its order: build the model
repository, list its files with their hashes (the listing its results keep), push it (git + git-lfs) to the
local bare remote, clone it back and compare every file. Prints a table of seconds per step.

    python benchmarks/publish_size.py --gb 3.8            # the size of internlm2-chat-1.8b in bf16
    python benchmarks/publish_size.py --gb 0.2            # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from random_model import build_model  # noqa: E402


def write_weights(path: Path, size: int, chunk: int = 64 << 20) -> None:
    """A valid safetensors file with one uint8 tensor of `size` random bytes, written a chunk at a time."""
    header = json.dumps({"weights": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=3.8, help="size of the weights file in GB (default 3.8)")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed after)")
    args = ap.parse_args(argv)

    from helpers.paths import work as make_work
    from helpers.publish import build_model_repo, default_remote, push_model_repo, repo_files, verify_push

    scratch = Path(args.dir or tempfile.mkdtemp(prefix="publish-size-"))
    w = make_work(scratch / "work")
    tiny = build_model(scratch / "tiny", tiny=True)
    shutil.copytree(tiny, w.final_model)
    t0 = time.perf_counter()
    write_weights(w.final_model / "model.safetensors", int(args.gb * 1e9))
    print(f"weights: {args.gb:.1f} GB written in {time.perf_counter() - t0:.0f} s ({w.final_model})", flush=True)

    rows = []

    def step(name, fn):
        start = time.perf_counter()
        out = fn()
        rows.append((name, time.perf_counter() - start))
        print(f"{name}: {rows[-1][1]:.1f} s", flush=True)
        return out

    # a made-up model of the size, not a merge: nothing to verify (06 reads a real one's record from the hash cache)
    repo = step("build the model repository", lambda: build_model_repo(w, "m", allow_unverified=True))
    step("list its files (sha256)", lambda: repo_files(repo))
    url = default_remote(w)
    step("push (git + git-lfs, local bare remote)", lambda: push_model_repo(w, url))
    verified = step("clone back and compare", lambda: verify_push(repo, url))
    print(f"\nidentical: {verified['identical']}, {verified['files']} files\n")
    print("| step | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")
    print(f"| all | {sum(s for _, s in rows):.1f} |")
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if verified["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
