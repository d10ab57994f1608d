"""`python -m helpers validate-data FILE`: check a dataset and say what is wrong in one sentence."""
from __future__ import annotations

import sys

from .data import DataError, validate_data



def add_command(sub) -> None:
    p = sub.add_parser("validate-data", help="check a training data file (XTuner 'conversation' or OpenAI 'messages')")
    p.add_argument("file")
    p.add_argument("--llava", action="store_true", help="check a LLaVA-format file (with its images)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    try:
        if args.llava:
            from .vlm_data import validate_llava_data  # the VLM track's validator

            summary = validate_llava_data(args.file)
        else:
            summary = validate_data(args.file)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("ok: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0
