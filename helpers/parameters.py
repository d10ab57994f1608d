"""Parameters as people write them: `-p lr 2e-4`, a parameter file, a class CSV cell; and one check of their types."""
from __future__ import annotations

import re
from pathlib import Path

import yaml


class ParameterError(ValueError):
    """A parameter of the wrong type or range, or an unreadable parameter file; the message says the fix."""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's numbers: PyYAML follows 1.1, where `2e-4` and `1e3` are strings, not floats."""


_FLOAT = r"[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(f"^(?:{_FLOAT})$"), list("-+0123456789."))
# ints win over floats: the int resolver (inherited) is tried first, so "3" stays 3


def parse_value(text: str):
    """One -p value or CSV cell: numbers (2e-4, .5, 10), booleans, None, lists as YAML; anything else stays text."""
    if text.strip() == "None":  # the notebooks' own word for "not set"
        return None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def read_params_file(path: str | Path) -> dict:
    """A YAML file of NAME: VALUE lines, read with the same numbers as -p; one sentence with the line if malformed."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"{path}: no such file; give a YAML file of NAME: VALUE lines.")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except UnicodeDecodeError:
        raise ParameterError(f"{path}: is not UTF-8 text; save it as UTF-8.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}" if mark else "somewhere"
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ParameterError(f"{path}: {where}: {problem}; write one 'NAME: VALUE' per line "
                             "(quote values that contain ': ' or start with a special character).") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise ParameterError(f"{path}: must be a mapping of NAME: VALUE lines (e.g. 'lr: 2e-4'), "
                             f"not a {type(loaded).__name__}.")
    return loaded


# ---------------------------------------------------------------- type checks where parameters enter
def _describe(kind) -> str:
    return {int: "a whole number", float: "a number", bool: "True or False", str: "text in quotes",
            list: "a list such as ['a', 'b']", dict: "a mapping such as {'a': 1}"}[kind]


def check_value(name: str, value, kind, *, minimum=None, above=None, maximum=None, below=None, optional: bool = False,
                choices=None, items=None, error=ParameterError):
    """Check one parameter (and return it, an int given for a float as float); raise `error` with one sentence."""
    if value is None and optional:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(isinstance(value, k) and not (k in (int, float) and isinstance(value, bool)) for k in kinds)
    if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    allowed = ("a number" if set(kinds) == {int, float} else " or ".join(_describe(k) for k in kinds)) \
        + (" (or None)" if optional else "")
    if not ok:
        raise error(f"{name} is {value!r} ({type(value).__name__}); use {allowed}.")
    if choices is not None and value not in choices:
        raise error(f"{name} is {value!r}; use one of {', '.join(repr(c) for c in choices)}.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or (minimum is not None and value < minimum) or (maximum is not None and value > maximum) \
                or (below is not None and value >= below) or (above is not None and value <= above):
            bounds = [f"at least {minimum}" if minimum is not None else "",
                      f"above {above}" if above is not None else "",
                      f"at most {maximum}" if maximum is not None else "",
                      f"below {below}" if below is not None else ""]
            raise error(f"{name} is {value!r}; use {allowed} {' and '.join(b for b in bounds if b)}.")
    if items is not None and isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, items):
                raise error(f"{name}[{i}] is {item!r} ({type(item).__name__}); every item must be "
                            f"{_describe(items)}.")
    return float(value) if kinds == (float,) and isinstance(value, int) else value


# ---------------------------------------------------------------- names: a misspelt or left-out parameter
# Names people bring from other tools; difflib cannot guess that learning_rate means lr.
OTHER_TOOLS_NAMES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "max_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "gradient_accumulation",
    "accumulative_counts": "gradient_accumulation", "max_seq_length": "max_length", "r": "lora_r",
    "lora_rank": "lora_r", "eval_steps": "evaluation_freq", "pretrained_model_name_or_path": "base_model",
    "model_name_or_path": "base_model", "model": "base_model", "output_dir": "work_dir",
}


def closest_name(name: str, known) -> str | None:
    """The known parameter a wrong name most likely meant (a name from another tool, a typo, other case)."""
    import difflib

    known = list(known)
    if name.lower() in known:
        return name.lower()
    aliases = {other: ours for other, ours in OTHER_TOOLS_NAMES.items() if ours in known}
    close = difflib.get_close_matches(name.lower(), known + list(aliases), n=1, cutoff=0.6)
    return aliases.get(close[0], close[0]) if close else None


def check_names(given: dict[str, str], declared: dict[str, list[str]], selected: list[str]) -> None:
    """Refuse, before anything runs, a parameter (name -> where it came from: "-p" or a file) that no notebook
    declares, or that only notebooks --only leaves out declare; one sentence naming each and the fix."""
    owners: dict[str, list[str]] = {}
    for notebook, names in declared.items():
        for name in names:
            owners.setdefault(name, []).append(notebook)

    def where(name: str) -> str:
        return f"-p {name}" if given[name] == "-p" else f"{given[name]}: {name}"

    if "work_dir" in given:
        raise ParameterError(f"{where('work_dir')}: the work directory is given with --work-dir; use --work-dir DIR instead.")
    unknown = [n for n in given if n not in owners]
    if unknown:
        named = []
        for name in unknown:
            guess = closest_name(name, owners)
            guess = "--work-dir" if guess == "work_dir" else guess
            named.append(where(name) + (f" (did you mean {guess}?)" if guess else ""))
        listing = "; ".join(f"{nb}: {', '.join(n for n in names if n != 'work_dir')}" for nb, names in declared.items())
        verb = "is not a parameter of any notebook" if len(unknown) == 1 else "are not parameters of any notebook"
        raise ParameterError(f"{' and '.join(named)} {verb}; fix the spelling or drop "
                             f"{'it' if len(unknown) == 1 else 'them'} (each notebook's parameters are in its first "
                             f"code cell: {listing}).")
    left_out = [n for n in given if not set(owners[n]) & set(selected)]
    if left_out:
        named = [f"{where(n)} is a parameter of {', '.join(owners[n])}" for n in left_out]
        single = all(len(owners[n]) == 1 for n in left_out)
        books = ", ".join(sorted({owners[n][0] for n in left_out})) if single else "one of those notebooks"
        raise ParameterError(f"{' and '.join(named)}, which --only leaves out; add {books} to --only "
                             f"or drop {'it' if len(left_out) == 1 else 'them'}.")
