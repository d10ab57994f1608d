"""XTuner's adapter and checkpoint files, written here in XTuner's exact formats (pth_to_hf output, mmengine's
iter_N.pth, a DeepSpeed ZeRO-2 iter_N.pth folder) for the tests and benchmarks/xtuner_real_size.py; random LoRA
weights on every linear layer of an InternLM2-layout model, named as XTuner's SupervisedFinetune names them."""
from __future__ import annotations

import json
import math
import sys
import types
from collections import OrderedDict
from pathlib import Path

R, ALPHA = 4, 8  # the tests' LoRA (the course's is r 64, lora_alpha 16)
# What mmengine keeps of the config in a checkpoint's meta (Config.pretty_text): types written as strings.
PRETTY_CFG = """SYSTEM = '你是小明的小助手'
model = dict(
    llm=dict(pretrained_model_name_or_path='/root/ft/model', trust_remote_code=True,
             type='transformers.AutoModelForCausalLM.from_pretrained'),
    lora=dict(bias='none', lora_alpha=%d, lora_dropout=0.1, r=%d, task_type='CAUSAL_LM', type='peft.LoraConfig'),
    type='xtuner.model.SupervisedFinetune',
    use_varlen_attn=False)
""" % (ALPHA, R)
# The config `xtuner train` copies into its work_dir, in the course's own form.
COURSE_CFG = """from peft import LoraConfig
from xtuner.model import SupervisedFinetune
SYSTEM = '你是小明的小助手'
model = dict(type=SupervisedFinetune, lora=dict(type=LoraConfig, r=%d, lora_alpha=%d, lora_dropout=0.1,
             bias='none', task_type='CAUSAL_LM'))
""" % (R, ALPHA)


def pretty_config(r: int, alpha: int, system: str = "你是小明的小助手") -> str:
    """PRETTY_CFG for another LoRA: what mmengine keeps of the config in a checkpoint's meta."""
    return PRETTY_CFG.replace("你是小明的小助手", system).replace(f"lora_alpha={ALPHA}", f"lora_alpha={alpha}") \
        .replace(f"r={R},", f"r={r},")


def course_config(r: int = R, alpha: int = ALPHA) -> str:
    """COURSE_CFG for another LoRA: the config `xtuner train` copies into its work_dir."""
    return COURSE_CFG.replace(f"r={R}, lora_alpha={ALPHA}", f"r={r}, lora_alpha={alpha}")


def random_lora(cfg: dict, r: int = R, scale: float = 0.3, seed: int = 1) -> dict:
    """Random LoRA weights on every linear layer of an InternLM2 model of config `cfg`, output included (XTuner's
    find_all_linear_names keeps InternLM2's `output`), named as XTuner's SupervisedFinetune.state_dict gives them."""
    import torch

    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    fused = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim
    shapes = {"attention.wqkv": (hidden, fused), "attention.wo": (hidden, hidden), "feed_forward.w1": (hidden, inter),
              "feed_forward.w3": (hidden, inter), "feed_forward.w2": (inter, hidden)}
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    modules = [f"model.layers.{i}.{m}" for i in range(cfg["num_hidden_layers"]) for m in shapes] + ["output"]
    for module in modules:
        fan_in, fan_out = shapes.get(module.split(".", 3)[-1], (hidden, cfg["vocab_size"]))
        state[f"llm.base_model.model.{module}.lora_A.default.weight"] = torch.randn(r, fan_in, generator=g) * scale
        state[f"llm.base_model.model.{module}.lora_B.default.weight"] = torch.randn(fan_out, r, generator=g) * scale
    return state


def expected_merge(base: dict, cfg: dict, lora: dict, r: int = R, alpha: int = ALPHA) -> dict:
    """base + (alpha/r)·B·A in InternLM2's own layout (as `xtuner convert merge` computes it), then converted as
    notebook 00 converts the base: what the kit's adapter must merge to, reached without the kit's adapter
    conversion. `base` may hold only some of the model's tensors; the LoRA of the others is passed over."""
    from helpers.internlm2 import convert_state_dict

    base = {k: v.float() for k, v in base.items()}
    for key, a in lora.items():
        module = key.removeprefix("llm.base_model.model.").split(".lora_A.")[0]
        if ".lora_A." in key and f"{module}.weight" in base:
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            base[f"{module}.weight"] = base[f"{module}.weight"] + (alpha / r) * (b.double() @ a.double()).float()
    return convert_state_dict(base, cfg)


class _Foreign:
    """A class of a library the kit does not install, pickled into a checkpoint as that library would."""

    def __init__(self, value=0):
        self.value = value


def _pickled_as(module: str, name: str, *args):
    """An object whose class pickles as `module.name` (mmengine's, DeepSpeed's), though that library is absent."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):  # pickle imports the module by name: every parent must be there too
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    mod = sys.modules[module]
    cls = type(name, (_Foreign,), {"__module__": module})
    setattr(mod, name, cls)
    return cls(*args)


def _forget(module: str) -> None:
    """Drop the stand-in library again: the kit must read the checkpoint without it."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        sys.modules.pop(".".join(parts[:i]), None)


def write_pth_to_hf(folder: Path, lora: dict, dtype=None, r: int = R, alpha: int = ALPHA) -> Path:
    """`xtuner convert pth_to_hf` output: PEFT's save_pretrained of the LoRA (adapter name dropped), its
    adapter_config.json, and xtuner_config.py."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    weights = {k.removeprefix("llm.").replace(".default", ""): (v.to(dtype) if dtype else v).contiguous()
               for k, v in lora.items()}
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "/root/ft/model", "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "lora_alpha": alpha, "lora_dropout": 0.1, "modules_to_save": None,
        "peft_type": "LORA", "r": r, "target_modules": ["w1", "wo", "w3", "w2", "wqkv", "output"],
        "task_type": "CAUSAL_LM", "revision": None, "layers_to_transform": None, "layers_pattern": None}, indent=2))
    (folder / "xtuner_config.py").write_text(course_config(r, alpha), encoding="utf-8")
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    return folder


def write_iter_pth(path: Path, state: dict, cfg: str = PRETTY_CFG) -> Path:
    """mmengine's checkpoint of an XTuner run: meta (with the config's text), state_dict, message_hub (mmengine
    objects), optimizer and schedulers."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"cfg": cfg, "seed": 0, "experiment_name": "internlm2_1_8b_qlora_alpaca_e3_copy",
                         "time": "20240301_120000", "mmengine_version": "0.10.3", "epoch": 2, "iter": 768},
                "state_dict": OrderedDict(state),
                "message_hub": {"log_scalars": {"train/loss": _pickled_as("mmengine.logging.history_buffer",
                                                                         "HistoryBuffer", [0.5, 0.4])},
                                "runtime_info": {"iter": 768}, "resumed_keys": {"iter": True}},
                "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": list(range(len(state)))}]},
                "param_schedulers": [{"by_epoch": False, "last_step": 768}]}, str(path))
    _forget("mmengine.logging.history_buffer")
    return path


def write_deepspeed(folder: Path, state: dict, world_size: int = 2) -> Path:
    """A DeepSpeed ZeRO-2 checkpoint folder as XTuner's --deepspeed deepspeed_zero2 saves iter_N.pth/: the 16-bit
    module copy and parameter shapes in mp_rank_00_model_states.pt, each rank's slice of the float32 master
    weights (one flat group, padded to 2 x world_size) in zero_pp_rank_R_mp_rank_00_optim_states.pt."""
    import torch

    folder.mkdir(parents=True)
    shapes = OrderedDict((k, v.shape) for k, v in state.items())
    torch.save({"module": OrderedDict((k, v.to(torch.bfloat16)) for k, v in state.items()), "buffer_names": [],
                "optimizer": None, "param_shapes": [shapes], "frozen_param_shapes": None, "shared_params": {},
                "frozen_param_fragments": None, "lr_scheduler": None, "sparse_tensor_module_names": set(),
                "skipped_steps": 0, "global_steps": 48, "global_samples": 768, "dp_world_size": world_size,
                "mp_world_size": 1, "ds_config": {"zero_optimization": {"stage": 2}}, "ds_version": "0.14.0"},
               str(folder / "mp_rank_00_model_states.pt"))
    flat = torch.cat([v.reshape(-1).float() for v in state.values()])
    align = 2 * world_size
    flat = torch.cat([flat, flat.new_zeros(align * math.ceil(flat.numel() / align) - flat.numel())])
    for rank, part in enumerate(flat.chunk(world_size)):
        torch.save({"optimizer_state_dict": {
            "loss_scaler": _pickled_as("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler", 65536.0),
            "dynamic_loss_scale": True, "overflow": False, "clip_grad": 1.0, "base_optimizer_state": {"state": {}},
            "single_partition_of_fp32_groups": [part.clone()], "zero_stage": 2, "group_paddings": [0],
            "partition_count": world_size, "ds_version": "0.14.0", "param_slice_mappings": [OrderedDict()]},
            "ds_config": {"zero_optimization": {"stage": 2}}, "ds_version": "0.14.0"},
            str(folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    _forget("deepspeed.runtime.fp16.loss_scaler")
    return folder
