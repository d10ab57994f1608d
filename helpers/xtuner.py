"""How the course's XTuner config (internlm2_chat_1_8b_qlora_alpaca_e3_copy.py) maps onto the kit's knobs."""
from __future__ import annotations

# (XTuner config field, the course's value, the kit's parameter in notebooks 01/02, note)
XTUNER_FIELDS = [
    ("pretrained_model_name_or_path", "/root/ft/model", "base_model", "notebook 00"),
    ("alpaca_en_path (data_path)", "/root/ft/data/personal_assistant.json", "data_path", "notebook 01 writes it"),
    ("prompt_template", "PROMPT_TEMPLATE.internlm2_chat", "(the tokenizer's chat template)", "one template for training and chat"),
    ("max_length", 1024, "max_length", ""),
    ("pack_to_max_length", True, "pack_to_max_length", ""),
    ("batch_size", 1, "batch_size", "per device"),
    ("accumulative_counts", 16, "gradient_accumulation", ""),
    ("max_epochs", 2, "epochs", "or max_steps"),
    ("optim_type / lr", "AdamW / 2e-4", "lr", "AdamW always"),
    ("max_norm", 1, "max_grad_norm", "preset"),
    ("warmup_ratio", 0.03, "warmup_ratio", "then cosine to 0"),
    ("save_steps / save_total_limit", "300 / 3", "save_steps / save_total_limit", ""),
    ("evaluation_freq", 300, "evaluation_freq", ""),
    ("SYSTEM", "''", "system", "notebook 01's"),
    ("evaluation_inputs", "['请你介绍一下你自己', '你是谁', '你是我的小助手吗']", "evaluation_inputs", "notebook 01's"),
    ("lora: r / lora_alpha / lora_dropout", "64 / 16 / 0.1", "lora_r / lora_alpha / lora_dropout", ""),
    ("quantization_config (load_in_4bit, nf4, double quant)", "4-bit NF4", "quantization", "'nf4' (or 'auto')"),
]


def xtuner_table(config):
    """The XTuner field, the course's value, the kit's parameter, and this run's value of it (a DataFrame)."""
    import pandas as pd

    def value(parameter: str):
        names = [n.strip() for n in parameter.split("/")]
        if not all(hasattr(config, n) for n in names):
            return ""
        return " / ".join(str(getattr(config, n)) for n in names)

    return pd.DataFrame([{"XTuner field": f, "course value": str(v), "kit parameter": p, "this run": value(p), "note": n}
                         for f, v, p, n in XTUNER_FIELDS]).set_index("XTuner field")
