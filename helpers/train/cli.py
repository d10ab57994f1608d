"""`python -m helpers train`: notebook 02's training headless, on one GPU or several (one rank per process)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .config import TrainConfig, TrainConfigError


def rank_main(config_values: dict, work_root: str) -> None:
    """One rank of a launch: train as that rank (train() joins the process group)."""
    from ..paths import work as make_work
    from .run import train

    train(TrainConfig(**config_values), make_work(work_root))


def launched_summary(work) -> dict:
    """train()'s summary after the ranks finished: the record beside the adapter, the rounds, the adapter loaded."""
    import torch

    from ..distributed import gpu_count
    from .results import evaluation_rounds, load_adapter_model

    record = json.loads((work.adapter / "training_record.json").read_text(encoding="utf-8"))
    evals = evaluation_rounds(work)
    model, _ = load_adapter_model(work)
    if gpu_count():
        model = model.to("cuda", torch.bfloat16)
    return record | {"adapter": str(work.adapter), "answers_before": evals[0]["answers"] if evals else [],
                     "answers_after": evals[-1]["answers"] if evals else [],
                     "evaluation_inputs": record["hyper_parameters"].get("evaluation_inputs"), "model": model.eval()}


def add_command(sub) -> None:
    from ..distributed import STRATEGIES

    p = sub.add_parser("train", help="train the adapter (notebook 02's training) headless, on one GPU or several")
    p.add_argument("--work-dir", default=None, help="work directory (default: ./work)")
    p.add_argument("--num-gpus", type=int, default=None, help="processes, one per GPU (default 1)")
    p.add_argument("--distributed", default=None, choices=STRATEGIES, help="ddp (default), zero2 or fsdp")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a TrainConfig field, e.g. -p preset homework -p lr 2e-4 (repeatable)")
    p.add_argument("--config-json", default=None, help=argparse.SUPPRESS)  # how a launch hands each rank its config
    p.set_defaults(func=_train_command)


def _train_command(args) -> int:
    from ..data import DataError
    from ..distributed import DistributedError, world_size
    from ..parameters import parse_value
    from ..paths import work as make_work
    from .run import train

    values = json.loads(args.config_json) if args.config_json else {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in args.param:
        if name not in fields:
            print(f"error: -p {name}: TrainConfig has no such field; use one of {', '.join(sorted(fields))}.",
                  file=sys.stderr)
            return 2
        values[name] = value if name in ("system", "base_model", "data_path") else parse_value(value)  # 2e-4: a number
    if args.num_gpus is not None:
        values["num_gpus"] = args.num_gpus
    if args.distributed is not None:
        values["distributed"] = args.distributed
    work = make_work(args.work_dir)
    try:
        if world_size() > 1:  # started by accelerate launch: this process is one rank
            rank_main(values, str(work.root))
            return 0
        result = train(TrainConfig(**values), work)
    except (TrainConfigError, DistributedError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result['steps']} updates in {result['train_seconds']:.0f} s, loss {result['first_loss']} -> "
          f"{result['final_loss']}; adapter: {result['adapter']}")
    return 0
