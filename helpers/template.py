"""The chat template: one source for training and inference, so the two can never disagree."""
from __future__ import annotations

# InternLM2 chat layout (a fact of the course's model): <|im_start|>{role}\n{content}<|im_end|>\n
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
END_OF_TURN = "<|im_end|>"


class TemplateError(ValueError):
    """A model's chat template or stop tokens do not fit the kit."""


def to_messages(conversation: list[dict], system: str | None = None) -> list[dict]:
    """XTuner 'conversation' turns -> chat messages (system, then user/assistant pairs).

    A non-empty `system` in a later turn becomes a system message before that turn's input, where XTuner
    renders it too; `system` (if given) replaces the first turn's.
    """
    messages = []
    for i, turn in enumerate(conversation):
        turn_system = system if i == 0 and system is not None else turn.get("system", "")
        if turn_system:
            messages.append({"role": "system", "content": turn_system})
        messages.append({"role": "user", "content": turn["input"]})
        if "output" in turn:
            messages.append({"role": "assistant", "content": turn["output"]})
    return messages


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn in this tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"The tokenizer in {getattr(tokenizer, 'name_or_path', '?')} has no chat_template; "
            "use the chat model's own tokenizer (the '-chat'/'-Instruct' variant), not the base one."
        )
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    tail = text.split("pong", 1)[1]
    for token in tokenizer.all_special_tokens + [END_OF_TURN, "<|eot_id|>", "<end_of_turn>"]:
        if token and tail.lstrip().startswith(token):
            return token
    if tokenizer.eos_token and tokenizer.eos_token in tail:
        return tokenizer.eos_token
    raise TemplateError(
        f"The chat template of {getattr(tokenizer, 'name_or_path', '?')} does not close an assistant turn "
        "with a special token, so generation would never stop; set tokenizer.chat_template to the model's chat format."
    )


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Ids that end generation: the template's end-of-turn token and eos, checked against generation_config."""
    eot = end_of_turn_token(tokenizer)
    ids = [tokenizer.convert_tokens_to_ids(eot)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if generation_config is not None and generation_config.eos_token_id is not None:
        configured = generation_config.eos_token_id
        configured = configured if isinstance(configured, list) else [configured]
        if ids[0] not in configured:
            raise TemplateError(
                f"generation_config.json stops at ids {configured} but the chat template ends turns with "
                f"{eot!r} (id {ids[0]}); add {ids[0]} to eos_token_id there, or the model will ramble on."
            )
    return ids


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def align_special_ids(model, tokenizer) -> dict:
    """Let the model's config and generation_config name the tokenizer's special ids, as transformers' Trainer does
    before training; where a base's files disagree, say so in one line (the Trainer's warning reads like an error).
    Returns the ids that changed. The generation_config keeps its stop ids, so answers still end at the turn's end."""
    from transformers.trainer_utils import align_special_tokens
    from transformers.utils import logging

    def named():
        generation = getattr(model, "generation_config", None)
        listed = lambda v: [v] if isinstance(v, int) else v  # noqa: E731 (the Trainer turns an int eos into a list)
        return {k: (getattr(model.config, k, None), listed(getattr(generation, k, None))) for k in SPECIAL_IDS}

    before, level = named(), logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        align_special_tokens(model, tokenizer)  # the Trainer's own alignment, so it finds nothing left to change
    finally:
        logging.set_verbosity(level)
    changed = {k: getattr(tokenizer, k) for k, ids in named().items() if ids != before[k]}
    if changed:
        print(f"note: the base model's config named other special ids than its tokenizer; training uses the "
              f"tokenizer's ({', '.join(f'{k} {v}' for k, v in changed.items())}), and answers still stop at "
              f"{end_of_turn_token(tokenizer)}.")
    return changed
