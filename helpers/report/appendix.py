"""The appendix: the bookkeeping (versions, hashes, settings, the first records of the data), shown collapsed."""
from __future__ import annotations

from ..paths import Work
from ..results import read_results
from .document import Section
from .records import NOTEBOOKS, _find_push, _scalars, _text

PREVIEW_RECORDS = 6
HYPER_KEYS = ("hyperparameters", "hyper_parameters", "training_config", "config", "settings")


def appendix_section(work: Work) -> Section:
    """The bookkeeping, collapsed: versions, hashes, settings and sizes, for a teacher who wants to check."""
    from ..data import DataError, load_dataset

    s = Section("appendix", "Appendix: bookkeeping", collapsed=True)
    results = {nb: read_results(work, name) for nb, name in NOTEBOOKS.items()}
    results = {nb: r for nb, r in results.items() if isinstance(r, dict) and "_unreadable" not in r}
    env = results.get("00", {})
    if env:
        s.table(["environment (notebook 00)", "value"], _scalars(env, skip=("recommendation", "qlora_4bit_note")))
        if isinstance(env.get("base_model_identity"), dict):
            identity = env["base_model_identity"]
            s.table(["base model", "value"], [(k, _text(identity[k])) for k in (
                "source", "architecture", "parameters", "hidden_size", "layers", "vocab_size", "content_sha256")
                                               if k in identity])
    data = results.get("01", {})
    if data:
        s.table(["data (notebook 01)", "value"], [(k, _text(data[k])) for k in (
            "records", "identity_records", "general_records", "format", "output_format", "questions",
            "evaluation_inputs", "system") if k in data])
        if isinstance(data.get("token_length"), dict):
            s.table(["token length", "value"], [(k, _text(v)) for k, v in data["token_length"].items()])
        try:
            conversations = load_dataset(work.dataset)
        except DataError as e:
            s.p(f"The data file cannot be previewed: {e}")
        else:
            s.p(f"The first {min(PREVIEW_RECORDS, len(conversations))} of {len(conversations)} records of "
                f"{work.dataset.name}:")
            roles = ("system", "user", "assistant")
            s.table(list(roles), [[" / ".join(m["content"] for m in c if m["role"] == role) for role in roles]
                                  for c in conversations[:PREVIEW_RECORDS]])
    train = results.get("02", {})
    if train:
        s.table(["training (notebook 02)", "value"], _scalars(train))
        hyper = next((train[k] for k in HYPER_KEYS if isinstance(train.get(k), dict)), None)
        if hyper:
            s.table(["hyper-parameter", "value"], _scalars(hyper))
    merge = results.get("03", {})
    if merge:
        s.table(["merge (notebook 03)", "value"], [(k, _text(merge[k])) for k in (
            "max_abs_diff", "tolerance", "passed", "dtype", "adapter_effect_max_abs", "size_bytes", "base_size_bytes",
            "adapter_size_bytes", "final_model") if k in merge])
    vlm = results.get("05", {})
    if vlm:
        s.table(["VLM (notebook 05)", "value"], _scalars(vlm))
    publish = results.get("06", {})
    if publish:
        push = _find_push(publish)
        s.table(["publish (notebook 06)", "value"], [(k, v) for k, v in _scalars(push) if k != "what_i_learned"])
    if not results:
        s.ran = False
        s.p("not run: no notebook has written its results in this work directory.")
    return s
