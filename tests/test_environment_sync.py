"""environment.yml's pip part and pyproject.toml's dependencies list the same packages and versions."""
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_pip_part_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_part = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pip_deps = [d for d in pip_part if not d.startswith("-e")]
    assert sorted(pip_deps) == sorted(deps), (
        f"only in environment.yml: {sorted(set(pip_deps) - set(deps))}; only in pyproject.toml: {sorted(set(deps) - set(pip_deps))}"
    )
    assert "-e ." in pip_part, "environment.yml must install the kit itself (-e .)"
