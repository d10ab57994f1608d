"""XTuner in and out: the course's own tool beside the kit.

- settings.py     XTunerError, and what the kit reads of an XTuner config's text (settings, LoRA)
- export.py       the course's config fields beside the kit's knobs; this run written as an XTuner config
- checkpoints.py  XTuner's adapter files on disk (pth_to_hf, iter_N.pth, DeepSpeed folders), read without XTuner
- adapter.py      an XTuner adapter converted into the kit's PEFT adapter (WORK/adapter)
- projector.py    the LLaVA pretrain's projector (the course's stage 1) in transformers' names
- cli.py          `python -m helpers xtuner export-config | import-adapter`
"""
from __future__ import annotations

from .adapter import (LORA_KEY, TOP_RENAMES, convert_adapter, converted_adapter, import_adapter, read_xtuner_adapter,
                      to_kit_names)
from .checkpoints import (FORMATS, INTERNLM2_LINEAR, XTUNER_RECORD, XTUNER_VERSION, load_checkpoint, source_sha256,
                          xtuner_format, xtuner_hint)
from .cli import add_command
from .export import (CONFIG_NAME, CONFIG_TEMPLATE, INTERNLM2_NAMES, LLAMA_LINEAR, XTUNER_FIELDS, config_settings,
                     export_config, render_config, xtuner_dir, xtuner_table)
from .projector import read_projector
from .settings import XTunerError, lora_settings, read_settings

__all__ = ["LORA_KEY", "TOP_RENAMES", "convert_adapter", "converted_adapter", "import_adapter", "read_xtuner_adapter",
           "to_kit_names", "FORMATS", "INTERNLM2_LINEAR", "XTUNER_RECORD", "XTUNER_VERSION", "load_checkpoint",
           "source_sha256", "xtuner_format", "xtuner_hint", "add_command", "CONFIG_NAME", "CONFIG_TEMPLATE",
           "INTERNLM2_NAMES", "LLAMA_LINEAR", "XTUNER_FIELDS", "config_settings", "export_config", "render_config",
           "xtuner_dir", "xtuner_table", "read_projector", "XTunerError", "lora_settings", "read_settings"]
