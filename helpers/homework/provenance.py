"""What the work was made from: the base model (by content; with --require-base, the class's; with
--require-preset, the adapter's LoRA settings) and the dataset (the one trained on, teaching the expected name)."""
from __future__ import annotations

import re
from pathlib import Path

from ..paths import Work
from .verdict import Check, Graded, _first_line, _not_run, trained_on


def _required_base(require_base: str) -> Path:
    """The folder a teacher's --require-base (folder or hub id) loads from: an InternLM2 checkpoint converted
    once into the grader's cache, as notebook 00 converts it."""
    import tempfile

    from ..base_model import _looks_like_hub_id, check_model_dir, hub_snapshot
    from ..fingerprint import folder_sha256
    from ..internlm2 import convert_internlm2, is_internlm2

    folder = hub_snapshot(require_base) if _looks_like_hub_id(require_base) else check_model_dir(Path(require_base))
    if is_internlm2(folder):
        out = Path(tempfile.gettempdir()) / "course-grader" / folder_sha256(folder)[:16]
        folder = Path(convert_internlm2(folder, out))
    return Path(folder)


def _source_of(identity: dict) -> str:
    return f"{identity['source']} ({identity['architecture']}, {identity['parameters']:,} parameters)"


def check_base(work: Work, graded: Graded, require_base: str | None, require_preset: str | None) -> Check:
    """Which base model the work was made on, by content; with --require-base, the one the class must use (every
    later check then judges on that base); with --require-preset, the adapter's LoRA settings are the preset's."""
    from ..base_model import ModelPathError, base_model_path
    from ..fingerprint import model_identity

    try:
        own = Path(base_model_path(work))
        mine = model_identity(own, cached=False)
    except (ModelPathError, OSError, ValueError, KeyError) as e:
        graded.base_problem = f"the work's base model cannot be read ({_first_line(e)}); run notebook 00"
        return Check("base", "FAIL", graded.base_problem)
    graded.base = str(own)
    said = [f"made on {_source_of(mine)}"]
    if require_base:
        try:
            required = _required_base(require_base)
        except (ModelPathError, OSError, ValueError) as e:
            return Check("base", "FAIL", f"--require-base {require_base}: {_first_line(e)}")
        theirs = model_identity(required, cached=False)
        graded.base = str(required)
        if theirs["content_sha256"] != mine["content_sha256"]:
            return Check("base", "FAIL", f"the work was made on {_source_of(mine)}, but the class requires "
                                               f"{require_base} ({_source_of(theirs)}); run the course on that model")
        said = [f"made on the required {require_base} ({_source_of(theirs)})"]
    if require_preset:
        problem = _preset_problem(work, require_preset)
        if problem:
            return Check("base", "FAIL", problem)
        said.append(f"the adapter has preset {require_preset}'s LoRA settings")
    return Check("base", "PASS", "; ".join(said))


def _preset_problem(work: Work, preset: str) -> str:
    """Whether WORK/adapter's own config holds the preset's LoRA rank, alpha, dropout and target layers."""
    import json

    from ..train import PRESETS

    if preset not in PRESETS:
        return f"--require-preset {preset}: no such preset; use one of {', '.join(PRESETS)}"
    try:
        config = json.loads((work.adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _not_run("02_qlora_finetune", work, f"the adapter {work.adapter}")
    want = PRESETS[preset]
    for key, field in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
        if key in want and float(config.get(field, -1)) != float(want[key]):
            return (f"the adapter was not trained with preset {preset}: its {field} is {config.get(field)}, the "
                    f"preset's {want[key]}; train with preset = {preset!r}")
    if want.get("train_lm_head") is False and "lm_head" in str(config.get("target_modules")):
        return f"the adapter was not trained with preset {preset}: it adapts the output layer, the preset does not"
    return ""


def _identity_of(conversations: list[list[dict]]) -> str | None:
    """The identity answer of a self-cognition dataset: its most frequent assistant answer."""
    from collections import Counter

    counts = Counter(m["content"] for c in conversations for m in c if m["role"] == "assistant")
    return counts.most_common(1)[0][0] if counts else None


def _name_in(identity: str) -> str | None:
    """The name an identity answer gives, where it follows the course's template (or 'I am X's assistant')."""
    from ..data import DEFAULT_ANSWER

    before, after = DEFAULT_ANSWER.split("{name}")
    for pattern in (re.escape(before) + r"(.+?)" + re.escape(after[:3]), r"^我是(.+?)的(?:小)?助手", r"I am (.+?)'s assistant"):
        m = re.search(pattern, identity)
        if m and m.group(1).strip():
            return m.group(1).strip()
    return None


def check_dataset(work: Work, graded: Graded, name: str | None) -> Check:
    """The dataset is the one the adapter was trained on (its hash), and it teaches the expected name."""
    from ..data import DataError, load_dataset
    from ..fingerprint import file_sha256

    if not work.dataset.exists():
        return Check("dataset", "FAIL", _not_run("01_data_generation", work, str(work.dataset)))
    try:
        conversations = load_dataset(work.dataset)
    except DataError as e:
        return Check("dataset", "FAIL", str(e))
    graded.identity = _identity_of(conversations)
    graded.name = name or _name_in(graded.identity or "")
    trained = trained_on(work).get("data_sha256")
    if trained and trained != file_sha256(work.dataset, cached=False):
        return Check("dataset", "FAIL", f"{work.dataset.name} changed after the adapter was trained on it; run "
                                        "notebooks 01 and 02 again")
    if not graded.name:
        return Check("dataset", "FAIL", f"the identity answer {graded.identity!r} does not say whose assistant it "
                                        "is in the course's words; give the expected name with --name")
    hits = sum(graded.name in m["content"] for c in conversations for m in c if m["role"] == "assistant")
    if not hits:
        return Check("dataset", "FAIL", f"no assistant answer in {work.dataset.name} mentions {graded.name!r}")
    imported = "" if trained else _imported_from(work)
    return Check("dataset", "PASS", f"{hits} of {len(conversations)} records answer with {graded.name!r}{imported}")


def _imported_from(work: Work) -> str:
    """For an adapter converted from XTuner: which file, and that its training data is not on record."""
    import json

    from ..xtuner import XTUNER_RECORD

    try:
        source = json.loads((work.adapter / XTUNER_RECORD).read_text(encoding="utf-8"))["source"]
    except (OSError, ValueError, KeyError):
        return ""
    return (f"; the adapter was converted from XTuner's {Path(source).name}, which does not record the data it "
            "was trained on, so identity and over-fitting are judged on its answers alone")
