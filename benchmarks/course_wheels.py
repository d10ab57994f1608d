"""Fetch the wheels notebooks 00 -> 06 need on the GPU machine (which has torch/transformers but no papermill or
Jupyter kernel), at this venv's versions, into a folder to carry (`benchmarks/gpu_course.py`).

    python benchmarks/course_wheels.py --dest /work/main/.whl        # then carry .whl (keep it under ~60 MiB)

Walks the requirements of papermill, ipykernel, ipywidgets, peft and bitsandbytes as installed here, leaves out
what the GPU image already has, and runs one `pip download --no-deps` per package for CPython 3.12 x86-64.
bitsandbytes keeps only its CUDA 13 and CPU libraries.

    python benchmarks/course_wheels.py --evaluate --dest .whl   # also what `helpers evaluate` needs (gpu_evaluate.py)
    python benchmarks/course_wheels.py --evaluate --check       # that set imports and scores here, in a clean folder

lm-eval's own requirements (scikit-learn, scipy, evaluate, rouge-score, pytablewriter, ...) weigh far more than the
64 MiB a run may carry, and a multiple-choice task imports few of them: EVALUATION lists those it does import
(measured from sys.modules after a run), each fetched with --no-deps.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOTS = ["papermill", "ipykernel", "ipywidgets", "peft", "bitsandbytes", "nbformat", "nbclient",
         "streamlit"]  # notebook 04 runs the web demo headless (AppTest)
ON_THE_IMAGE = {  # the GPU image's packages that these roots need (read from the device notes, 2026-11-17)
    "torch", "transformers", "accelerate", "numpy", "pandas", "matplotlib", "pyyaml", "tqdm", "requests", "jinja2",
    "huggingface-hub", "safetensors", "tokenizers", "packaging", "psutil", "pygments", "click", "attrs", "filelock",
    "fsspec", "typing-extensions", "aiohttp", "certifi", "idna", "urllib3", "charset-normalizer", "pillow",
    "python-dateutil", "six", "sentencepiece", "regex", "markupsafe", "setuptools", "wheel", "pip",
    "pyarrow", "protobuf", "narwhals", "rich",
}
# `import lm_eval` + a multiple-choice task on the hf backend, beyond the image and the roots above (measured)
EVALUATION = ["lm-eval", "datasets", "dill", "multiprocess", "xxhash", "sacrebleu", "portalocker", "tabulate",
              "colorama", "lxml"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed() -> dict[str, str]:
    """name -> installed version, for the roots and everything they require (no extras), minus the image's."""
    seen, todo = {}, list(ROOTS)
    while todo:
        name = norm(todo.pop())
        if name in seen or name in ON_THE_IMAGE:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    seen.setdefault("bitsandbytes", "0.50.2")  # not installed on a CPU-only machine; the GPU path needs it
    seen.setdefault("liger-kernel", "0.8.5")  # the plan's fused layers (pyproject's [gpu] extra); triton is on the image
    return seen


def image_view(folder: Path) -> Path:
    """A folder of links to this venv's installed copies of what the GPU image holds (torch, transformers,
    accelerate, ON_THE_IMAGE and everything they require), standing in for the image in --check."""
    folder.mkdir(parents=True, exist_ok=True)
    seen, todo = set(), ["torch", "transformers", "accelerate", *ON_THE_IMAGE, "peft"]  # peft: a root, carried
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or [] if "extra ==" not in r]
        site = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if (site / top).exists() and not (folder / top).exists():
                (folder / top).symlink_to(site / top)
    return folder


def strip_wheel(wheel: Path, keep) -> None:
    """Rewrite a wheel with only the entries `keep(name)` accepts."""
    kept = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(kept, "w", zipfile.ZIP_DEFLATED) as out:
        for item in src.infolist():
            if keep(item.filename):
                out.writestr(item, src.read(item))
    kept.replace(wheel)


def lm_eval_keeps(name: str) -> bool:
    """lm-eval without its benchmark definitions (lm_eval/tasks/<benchmark>/: most of the wheel): the kit's task is
    its own file, and a benchmark subset needs the network to download its data anyway."""
    return re.match(r"lm_eval/tasks/[^/]+/", name) is None


def check_evaluation_set(versions: dict[str, str]) -> int:
    """pip install EVALUATION --no-deps --target a clean folder (wheels for this interpreter, lm-eval stripped as
    it travels), then score the kit's multiple-choice task on a tiny model with only that folder, the image's
    packages and the kit on the path."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="evaluation-set-"))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp / "wheels"),
                    *[f"{n}=={v}" for n, v in versions.items()]], check=True)
    for wheel in (tmp / "wheels").glob("lm_eval-*.whl"):
        strip_wheel(wheel, lm_eval_keeps)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp / "target"),
                    *map(str, (tmp / "wheels").glob("*.whl"))], check=True)
    image = image_view(tmp / "image")
    probe = ("import sys; sys.path[:0] = sys.argv[1:4]; "
             "from random_model import build_model; from helpers.evaluate import multiple_choice; "
             "print('course_mc accuracy', multiple_choice(build_model(sys.argv[4] + '/model', tiny=True), limit=8))")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-S", "-c", probe, str(tmp / "target"), str(image), str(root),
                             str(tmp)], cwd=root / "benchmarks", env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                     "HOME": str(tmp)})
    print("the evaluation set imports and scores" if result.returncode == 0 else "the evaluation set is incomplete")
    return result.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=".whl")
    ap.add_argument("--list", action="store_true", help="only print what would be fetched")
    ap.add_argument("--evaluate", action="store_true", help="add what `helpers evaluate` needs (EVALUATION)")
    ap.add_argument("--check", action="store_true", help="with --evaluate: check that set in a clean --target folder")
    args = ap.parse_args(argv)
    wanted = needed()
    if args.evaluate:
        evaluation = {norm(n): md.version(n) for n in EVALUATION}
        if args.check:
            return check_evaluation_set(evaluation)
        wanted.update(evaluation)
    if args.list:
        print("\n".join(f"{k}=={v}" for k, v in sorted(wanted.items())))
        return 0
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    platform = sum((["--platform", p] for p in PLATFORMS), [])
    for name, version in sorted(wanted.items()):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platform, "-d", str(dest),
                        f"{name}=={version}"], check=True)
    for wheel in dest.glob("bitsandbytes-*.whl"):  # only the CUDA 13 and CPU libraries travel
        strip_wheel(wheel, lambda name: (lib := re.search(r"libbitsandbytes_(\w+)\.so$", name)) is None
                    or lib.group(1) in ("cpu", "cuda130"))
    for wheel in dest.glob("lm_eval-*.whl"):
        strip_wheel(wheel, lm_eval_keeps)
    total = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
