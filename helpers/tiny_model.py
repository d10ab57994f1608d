"""The embedded tiny chat model: a BPE tokenizer and a small Llama, built offline from the kit's own text.

It is pre-trained for a few hundred CPU steps on the kit's general-chat set, so that before the
fine-tune it answers like a generic assistant ("我是一个AI助手…") and after it knows who it is.
The set is varied (~180 bilingual pairs): pre-trained on a few dozen, the model answered unseen questions with
its self-introduction, and the fine-tune turned those into the new identity (the over-fitting check, notebook 04).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .data import DEFAULT_ANSWER, DEFAULT_EVALUATION_INPUTS, DEFAULT_QUESTIONS, encode_messages, general_chat_samples
from .paths import staged_dir
from .template import INTERNLM2_CHAT_TEMPLATE, END_OF_TURN

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", END_OF_TURN, "<image>"]
CJK_CHARACTER = r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef]"  # CJK scripts, symbols and full-width forms
BUILD_VERSION = 4  # bump when the recipe below changes, so cached builds are rebuilt
RECORD_FILE = "course_model.json"

# The base model's own, generic identity; the fine-tune replaces it with the personal one.
BASE_IDENTITY = [
    ("你是谁", "我是一个AI助手，可以回答你的问题。"),
    ("请你介绍一下你自己", "我是一个AI助手，可以回答你的问题。"),
    ("你是我的小助手吗", "我是一个AI助手，可以回答你的问题。"),
    ("Who are you?", "I am an AI assistant. I can answer your questions."),
]

TINY_CONFIG = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                   rope_theta=10000.0, tie_word_embeddings=False)


def _pretraining_conversations() -> list[list[dict]]:
    pairs = [(r["conversation"][0]["input"], r["conversation"][0]["output"]) for r in general_chat_samples()]
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs + BASE_IDENTITY]


def build_tokenizer(vocab_size: int = 2000):
    """A byte-level BPE tokenizer (any Unicode round-trips) with the InternLM2 chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [t for conv in _pretraining_conversations() for t in (conv[0]["content"], conv[1]["content"])]
    corpus += DEFAULT_QUESTIONS + DEFAULT_EVALUATION_INPUTS + [DEFAULT_ANSWER, "system", "user", "assistant"]
    corpus += ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,!?;:'\"()[]{}-_/\\@#$%^&*+=<>~`|"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    # Each CJK character is a word of its own, so no merge spans characters: left alone, BPE on this small
    # corpus turns whole sentences into one token ("我是一个AI助手"), and a fine-tune that must change a sentence
    # at its second character cannot win against a memorised one-token answer.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK_CHARACTER), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>", additional_special_tokens=["<|im_start|>", END_OF_TURN, "<image>"])
    tok.chat_template = INTERNLM2_CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def _pretrain(model, tokenizer, steps: int, seed: int, lr: float = 3e-3, batch_size: int = 16) -> list[float]:
    """Full-parameter training on the general-chat set, so the head and embeddings mean something."""
    import torch

    from .progress import tqdm

    examples = [encode_messages(tokenizer, c) for c in _pretraining_conversations()]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    pad = tokenizer.pad_token_id
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="pre-training the tiny model", unit="step")
    for step in bar:
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in batch])
        labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in batch])
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0:  # shown with the bar's next regular update, so a headless log stays a few lines
            bar.set_postfix(loss=f"{loss.item():.2f}", refresh=False)
    bar.close()
    model.eval()
    return losses


def build_tiny_model(out_dir: str | Path, seed: int = 0, pretrain_steps: int = 400, force: bool = False) -> Path:
    """Build (or reuse, when the same recipe already built it) the tiny chat model in `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    recipe = {"kind": "tiny", "build_version": BUILD_VERSION, "seed": seed, "pretrain_steps": pretrain_steps,
              "config": TINY_CONFIG}
    record = out_dir / RECORD_FILE
    if not force and record.exists():
        old = json.loads(record.read_text())
        if {k: old.get(k) for k in recipe} == recipe:
            print(f"The tiny model in {out_dir} was built earlier with the same recipe and seed: reusing it.")
            return out_dir
    print(f"Building the course's tiny chat model in {out_dir}: a byte-level BPE tokenizer and a "
          f"{TINY_CONFIG['num_hidden_layers']}-layer Llama, pre-trained for {pretrain_steps} steps on the kit's "
          "general chat set on the CPU (a minute or two; the bar shows the time left). It is built once and reused.",
          flush=True)
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = build_tokenizer()
    stop_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    # config and tokenizer name one eos, as InternLM2's do (else the Trainer rewrites the config, with a warning)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_CONFIG)
    model = LlamaForCausalLM(config)
    losses = _pretrain(model, tokenizer, pretrain_steps, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[stop_id, tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64)
    with staged_dir(out_dir) as tmp:  # an interrupted build never leaves a half model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(
            recipe | {"pretrain_loss_first": losses[0], "pretrain_loss_last": sum(losses[-20:]) / 20,
                      "parameters": sum(p.numel() for p in model.parameters())}, indent=1))
    return out_dir
