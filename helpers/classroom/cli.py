"""The command-line flags that `run --class` and `homework check --class` share, and the engine they choose."""
from __future__ import annotations

import sys

from .engines import ClassRunError, SlurmOptions


def add_class_arguments(p) -> None:
    g = p.add_argument_group("class runs (with --class)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="students at once on this machine: one GPU each (round robin), or a share of the CPU")
    g.add_argument("--slurm", action="store_true", help="run the students as a Slurm job array (submitit) instead")
    g.add_argument("--slurm-partition", default=None, metavar="NAME", help="Slurm partition (default: the cluster's default)")
    g.add_argument("--max-parallel", type=int, default=8, metavar="N", help="with --slurm: students running at once")
    g.add_argument("--slurm-gpus", type=int, default=1, metavar="N", help="with --slurm: GPUs per student")
    g.add_argument("--slurm-cpus", type=int, default=8, metavar="N", help="with --slurm: CPU cores per student")
    g.add_argument("--slurm-time", type=int, default=240, metavar="MIN", help="with --slurm: minutes per student before Slurm stops it")
    g.add_argument("--slurm-mem", type=int, default=None, metavar="GB", help="with --slurm: memory per student in GB")
    g.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="with --slurm: any other sbatch option, e.g. account=course (repeatable)")


def slurm_options(args) -> SlurmOptions | None:
    """The Slurm settings of the command line, or None for the local pool."""
    if not args.slurm:
        return None
    extra = {}
    for item in args.slurm_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ClassRunError(f"--slurm-option {item!r} is not KEY=VALUE; write it like account=course.")
        extra[key.strip().lstrip("-").replace("-", "_")] = value
    if args.max_parallel < 1:
        raise ClassRunError(f"--max-parallel is {args.max_parallel}; give 1 or more students to run at once.")
    return SlurmOptions(args.slurm_partition, args.max_parallel, args.slurm_gpus, args.slurm_cpus, args.slurm_time,
                        args.slurm_mem, extra)


def with_engine(command, args, *positional, **keywords) -> int:
    """command(..., workers=, slurm=) with the command line's pool or Slurm settings; a bad flag: one sentence."""
    try:
        slurm = slurm_options(args)
    except ClassRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return command(*positional, workers=args.workers, slurm=slurm, **keywords)
