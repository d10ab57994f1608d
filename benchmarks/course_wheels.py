"""Fetch the wheels notebooks 00 -> 06 need on the GPU machine (which has torch/transformers but no papermill or
Jupyter kernel), at this venv's versions, into a folder to carry (`benchmarks/gpu_course.py`).

    python benchmarks/course_wheels.py --dest /work/main/.whl        # then carry .whl (keep it under ~60 MiB)

Walks the requirements of papermill, ipykernel, ipywidgets, peft and bitsandbytes as installed here, leaves out
what the GPU image already has, and runs one `pip download --no-deps` per package for CPython 3.12 x86-64.
bitsandbytes keeps only its CUDA 13 and CPU libraries.
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
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=".whl")
    ap.add_argument("--list", action="store_true", help="only print what would be fetched")
    args = ap.parse_args(argv)
    wanted = needed()
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
        keep = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(keep, "w", zipfile.ZIP_DEFLATED) as out:
            for item in src.infolist():
                lib = re.search(r"libbitsandbytes_(\w+)\.so$", item.filename)
                if lib is None or lib.group(1) in ("cpu", "cuda130"):
                    out.writestr(item, src.read(item))
        keep.replace(wheel)
    total = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
