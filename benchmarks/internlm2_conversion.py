"""What converting an InternLM2 checkpoint costs (notebook 00 does it once per work directory): seconds for the
tokenizer and for the weights, peak memory, disk. A random checkpoint at internlm2-chat-1_8b's real dimensions
and the real tokenizer files, so that only the values differ from the real one.

    python benchmarks/internlm2_conversion.py [--layers 24] [--out /tmp/internlm2-bench]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers.internlm2 import convert_internlm2, internlm2_tokenizer  # noqa: E402
from internlm2_standin import build_standin  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24, help="24: internlm2-chat-1_8b")
    parser.add_argument("--out", default="/tmp/internlm2-bench")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    src = out / "internlm2-chat-1_8b"
    build_standin(src, hidden=2048, layers=args.layers, intermediate=8192)
    start = time.perf_counter()
    internlm2_tokenizer(src)
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    dst = convert_internlm2(src, out / "converted")
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    convert_internlm2(src, dst)
    reuse_s = time.perf_counter() - start
    size = lambda p: sum(f.stat().st_size for f in p.iterdir() if f.is_file()) / 2**30  # noqa: E731
    print(json.dumps({"layers": args.layers, "checkpoint_gib": round(size(src), 2), "converted_gib": round(size(dst), 2),
                      "tokenizer_s": round(tokenizer_s, 1), "conversion_s (tokenizer included)": round(convert_s, 1),
                      "reuse_s": round(reuse_s, 2),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)}, indent=1))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
