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
    "helpers.xtuner",
    "helpers.evaluate",
    "helpers.serve",
    "helpers.export",
]


def unknown_train_parameter(names: list[str]) -> str | None:
    """`train -p NAME`: a name TrainConfig lacks, in one sentence with the closest field (the runner checks its own)."""
    import dataclasses

    from .parameters import closest_name
    from .train import TrainConfig

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    for name in names:
        if name not in fields:
            guess = closest_name(name, fields)
            return (f"-p {name}" + (f" (did you mean {guess}?)" if guess else "") + " is not a TrainConfig field; "
                    f"fix the spelling or use one of notebook 02's training knobs: {', '.join(fields)}.")
    return None


TEXT_OPTIONS = ("--name", "--system")  # free text, which may begin with "-" (a student named "-Ann")


def joined_text_options(argv: list[str]) -> list[str]:
    """`--name -Ann` as `--name=-Ann`: argparse would take a value that begins with "-" for an option of its own
    (a long option or a short one like -h after --name is still read as the option it is)."""
    out, i = [], 0
    while i < len(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if argv[i] in TEXT_OPTIONS and value.startswith("-") and not value.startswith("--") and len(value) > 2:
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(sub)
    args = parser.parse_args(joined_text_options(sys.argv[1:] if argv is None else list(argv)))
    if args.command == "train" and (error := unknown_train_parameter([n for n, _ in args.param])):
        print(f"error: {error}", file=sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
