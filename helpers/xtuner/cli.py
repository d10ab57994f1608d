"""`python -m helpers xtuner export-config WORK` and `… import-adapter SOURCE WORK`."""
from __future__ import annotations

from .adapter import import_adapter
from .export import CONFIG_NAME, export_config
from .settings import XTunerError


def add_command(sub) -> None:
    p = sub.add_parser("xtuner", help="XTuner in and out: export this run's config, import an XTuner adapter")
    verbs = p.add_subparsers(dest="verb", required=True)
    export = verbs.add_parser("export-config", help="write the run's XTuner config (from WORK/adapter's record)")
    export.add_argument("work_dir", help="the run's work directory")
    export.add_argument("--out", default=None, help=f"the config file (default: WORK/xtuner/{CONFIG_NAME})")
    export.set_defaults(func=_export)
    imports = verbs.add_parser("import-adapter", help="convert XTuner's pth_to_hf folder or iter_N.pth into WORK/adapter")
    imports.add_argument("source", help="XTuner's pth_to_hf output folder, or an iter_N.pth file or folder")
    imports.add_argument("work_dir", help="the work directory whose base model (notebook 00) the adapter belongs to")
    imports.set_defaults(func=_import)


def _export(args) -> int:
    import sys

    from ..paths import work

    try:
        path = export_config(work(args.work_dir, create=False), args.out)
    except XTunerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"XTuner config: {path}\nin XTuner:     xtuner train {path} --work-dir {path.parent / 'train'}"
          f"\nthen:          xtuner convert pth_to_hf {path} {path.parent / 'train'}/iter_N.pth {path.parent / 'huggingface'}")
    return 0


def _import(args) -> int:
    import sys

    from ..base_model import ModelPathError
    from ..paths import work

    try:
        path = import_adapter(work(args.work_dir, create=False), args.source)
    except (XTunerError, ModelPathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"adapter: {path} (from {args.source}); merge it with notebook 03 or chat: "
          f"python -m helpers chat {args.work_dir}/model --adapter {path}")
    return 0
