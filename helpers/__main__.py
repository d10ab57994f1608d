"""Command line: python -m helpers COMMAND ... (run, validate-data, chat, web, homework, report, ...)."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each command lives in its module as `add_command(subparsers)`; add a module here to add a command.
COMMAND_MODULES = [
    "helpers.runner",
    "helpers.validate",
    "helpers.notebooks",
    "helpers.chat",
    "helpers.homework",
    "helpers.report",
    "helpers.train",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
