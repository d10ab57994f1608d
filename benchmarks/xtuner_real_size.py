"""XTuner's files at internlm2-chat-1_8b's real size, through the kit's own path (notebooks 00, 03 and 05).

An InternLM2 checkpoint with random weights at the real dimensions (hidden 2048, 24 layers, 16 heads / 8 KV heads,
FFN 8192, vocab 92,544; the real tokenizer.model) is prepared as notebook 00 does. A LoRA of the course's config
(r 64, lora_alpha 16, every linear layer and the output layer, InternLM2's names with the fused wqkv) is written in
each of XTuner's three formats (pth_to_hf output in float16, mmengine's iter_768.pth, a 2-rank DeepSpeed
iter_768.pth folder), converted by `import_adapter`, and merged by `merge` under the whole-model check. The merged
weights are compared with base + (alpha/r)·B·A computed in InternLM2's own layout (as `xtuner convert merge` does)
and then converted as the base was. With --vlm, the LLaVA pretrain's projector (CLIP ViT-L/14-336 -> hidden 2048,
XTuner's iter_2181.pth) replaces stage 1 and stage 2 trains from it for --vlm-steps updates.
Nothing is downloaded. Prints one table (step | seconds | result).

    python benchmarks/xtuner_real_size.py [--out /tmp/xtuner-real] [--layers 24] [--vlm]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

R, ALPHA = 64, 16  # the course's internlm2_1_8b_qlora_alpaca_e3 LoRA
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)


class Steps:
    """Each step's seconds and result, printed as one table at the end."""

    def __init__(self):
        self.rows = []

    def run(self, name: str, fn):
        start = time.perf_counter()
        result, said = fn()
        self.rows.append((name, time.perf_counter() - start, said))
        print(f"{name}: {said} ({self.rows[-1][1]:.1f} s)", flush=True)
        return result

    def table(self) -> str:
        lines = ["| step | seconds | result |", "|---|---:|---|"]
        lines += [f"| {n} | {s:.1f} | {r} |" for n, s, r in self.rows]
        return "\n".join(lines)


def _agreement(got, want, base) -> tuple[float, float]:
    """(share of elements equal to bf16(want), the largest difference from it in bf16 steps at the size of the
    element or of the base weight it was added to, whichever is larger: a sum that cancels keeps only that)."""
    import torch

    rounded = want.to(torch.bfloat16).float()
    size = torch.maximum(rounded.abs(), base.float().abs()).clamp_min(1e-30)
    step = torch.exp2(torch.floor(torch.log2(size)) - 7)  # bf16 keeps 8 significant bits
    return (got.float() == rounded).float().mean().item(), ((got.float() - rounded).abs() / step).max().item()


def llm_part(out: Path, layers: int, steps: Steps):
    import torch
    from safetensors.torch import load_file

    from helpers.base_model import base_model_path, prepare_base_model
    from helpers.internlm2 import convert_state_dict
    from helpers.merge import merge
    from helpers.paths import work
    from helpers.xtuner import import_adapter
    from internlm2_standin import build_standin
    from xtuner_formats import (course_config, expected_merge, pretty_config, random_lora, write_deepspeed,
                                write_iter_pth, write_pth_to_hf)

    src = out / "internlm2-chat-1_8b"
    steps.run("random InternLM2 checkpoint", lambda: (build_standin(src, hidden=2048, layers=layers, intermediate=8192),
                                                     f"{layers} layers, real tokenizer.model"))
    cfg = json.loads((src / "config.json").read_text())
    w = work(out / "work")
    steps.run("notebook 00: prepare (convert to the Llama layout)",
              lambda: (prepare_base_model(str(src), w), "WORK/model/converted"))
    lora = random_lora(cfg, r=R, scale=0.05)
    count = sum(t.numel() for t in lora.values())
    sources = {
        "pth_to_hf (float16)": write_pth_to_hf(out / "huggingface", lora, dtype=torch.float16, r=R, alpha=ALPHA),
        "iter_768.pth": write_iter_pth(out / "train" / "iter_768.pth", lora, cfg=pretty_config(R, ALPHA)),
        "DeepSpeed iter_768.pth/ (2 ranks)": write_deepspeed(out / "train_ds" / "iter_768.pth", lora),
    }
    (out / "train_ds" / "internlm2_1_8b_qlora_alpaca_e3_copy.py").write_text(course_config(R, ALPHA), encoding="utf-8")
    converted = {}
    for kind, source in sources.items():
        def convert(source=source):
            adapter = import_adapter(w, source)
            weights = load_file(str(adapter / "adapter_model.safetensors"))
            config = json.loads((adapter / "adapter_config.json").read_text())
            return weights, (f"{len(weights)} tensors, {count / 1e6:.1f} M LoRA parameters, r {config['r']}, "
                             f"lora_alpha {config['lora_alpha']}")
        converted[kind] = steps.run(f"import {kind}", convert)
    half, ckpt, ds = (converted[k] for k in sources)
    exact = ckpt.keys() == ds.keys() == half.keys() and all(torch.equal(ckpt[k], ds[k]) for k in ckpt)
    rounding = max(((half[k].float() - ckpt[k]).abs().max() / ckpt[k].abs().max()).item() for k in ckpt)
    steps.rows.append(("the three formats agree", 0.0, f"iter_768.pth = DeepSpeed folder, bit for bit: {exact}; "
                                                       f"float16 pth_to_hf within {rounding:.1e} of the largest value"))
    if not exact:
        raise SystemExit("the checkpoint and the DeepSpeed folder converted to different adapters")
    import_adapter(w, sources["iter_768.pth"])
    final = out / "final_model"

    def do_merge():
        result = merge(base_model_path(w), w.adapter, final)
        v = result.verification
        if not v["passed"]:
            raise SystemExit(f"the merge check failed: {v['problem']}")
        weights = v.get("weights") or {}
        return v, (f"verified: weights within {weights.get('max_ulps', float('nan')):.0f} ulp of W + B·A in "
                   f"{v['dtype']}, max |logit diff| {v['max_abs_diff']:.3g} <= {v['tolerance']:.3g}; the adapter "
                   f"moves the logits by {v['adapter_effect_max_abs']:.2f}")
    steps.run("notebook 03: merge + whole-model check", do_merge)

    def against_xtuner():
        picked = {k: v for k, v in load_file(str(src / "model.safetensors")).items()
                  if k == "output.weight" or k.startswith(("model.layers.0.", f"model.layers.{layers - 1}."))}
        want = expected_merge(picked, cfg, lora, r=R, alpha=ALPHA)
        merged = {}
        for f in sorted(final.glob("*.safetensors")):
            merged.update({k: v for k, v in load_file(str(f)).items() if k in want})
        base = convert_state_dict(picked, cfg)
        names = [k for k in want if k.endswith("proj.weight") or k == "lm_head.weight"]
        found = {k: _agreement(merged[k], want[k], base[k]) for k in names}
        share, off = min(e for e, _ in found.values()), max(o for _, o in found.values())
        return None, (f"{len(names)} merged tensors (layers 0 and {layers - 1}, lm_head): at least {share:.4%} of "
                      f"their elements equal bf16(W + (alpha/r)·B·A) exactly, the rest within {off:.0f} bf16 step")
    steps.run("merged = XTuner's own merge, converted", against_xtuner)
    return w


def vlm_part(w, out: Path, updates: int, steps: Steps):
    import torch

    from helpers import vlm_train as vt
    from helpers.vlm import build_vision_tower, load_vlm, prepare_vlm
    from helpers.vlm_data import make_llava_data
    from xtuner_formats import write_iter_pth

    vision = steps.run("random CLIP ViT-L/14-336", lambda: (build_vision_tower(out / "clip-vit-large-patch14-336",
                                                                               **CLIP_L_336), "24 layers, 577 tokens"))
    steps.run("notebook 05: build the LLaVA", lambda: (prepare_vlm(w, None, str(vision)), "WORK/vlm/base_model"))
    g = torch.Generator().manual_seed(3)
    projector = {"projector.model.0.weight": torch.randn(2048, 1024, generator=g) * 0.02,
                 "projector.model.0.bias": torch.zeros(2048),
                 "projector.model.2.weight": torch.randn(2048, 2048, generator=g) * 0.02,
                 "projector.model.2.bias": torch.zeros(2048)}
    checkpoint = write_iter_pth(out / "llava_pretrain" / "iter_2181.pth", projector)
    files = make_llava_data(w.vlm_data)

    def load_projector():
        vt.use_pretrained_projector(w, checkpoint, files["image"], ["请描述这张图片。"])
        aligned, _ = load_vlm(w.vlm_aligned_model)
        layer = aligned.model.multi_modal_projector
        dtype = layer.linear_1.weight.dtype
        same = all(torch.equal(getattr(layer, name).weight, projector[f"projector.model.{i}.weight"].to(dtype))
                   for i, name in ((0, "linear_1"), (2, "linear_2")))
        if not same:
            raise SystemExit("the aligned model's projector is not the checkpoint's")
        return None, (f"iter_2181.pth's projector in WORK/vlm/aligned_model: Linear{tuple(layer.linear_1.weight.shape)[::-1]} "
                      f"-> GELU -> Linear{tuple(layer.linear_2.weight.shape)[::-1]}, equal to the checkpoint's")
    steps.run("pretrained_projector = iter_2181.pth (stage 1 skipped)", load_projector)
    config = vt.stage_config(2, "homework", max_steps=updates, evaluation_freq=updates, save_steps=updates,
                             gradient_accumulation=1, evaluation_inputs=["房子是什么颜色的？"])  # one row an update

    def stage2():
        result = vt.train_stage(w, 2, w.vlm_aligned_model, files["conversations"], files["image"], config)
        return result, f"{result['steps']} updates, loss {result['first_loss']:.3f} -> {result['final_loss']:.3f}"
    steps.run("stage 2 from it", stage2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/xtuner-real")
    parser.add_argument("--layers", type=int, default=24, help="24: internlm2-chat-1_8b")
    parser.add_argument("--vlm", action="store_true", help="also the LLaVA track from XTuner's projector")
    parser.add_argument("--vlm-steps", type=int, default=1, help="stage-2 updates with --vlm")
    args = parser.parse_args(argv)
    import torch

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    steps = Steps()
    w = llm_part(out, args.layers, steps)
    if args.vlm:
        vlm_part(w, out, args.vlm_steps, steps)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n{device}, torch {torch.__version__}; peak host memory {peak:.1f} GiB\n")
    print(steps.table())
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
