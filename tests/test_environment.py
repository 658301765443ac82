"""One pinned environment, written three ways: pyproject.toml's extras, environment.yml, constraints.txt."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]

# conda-forge names for packages that PyPI names otherwise.
CONDA_TO_PYPI = {"pytorch-cpu": "torch", "pytorch": "torch", "python-build": "build"}
# Not pinned packages of the book: the interpreter and the installer.
NOT_PINNED = {"python", "pip"}


def normalize(name: str) -> str:
    """PEP 503 normal form, with conda-forge's names mapped to PyPI's."""
    name = re.sub(r"[-_.]+", "-", name.strip()).lower()
    return CONDA_TO_PYPI.get(name, name)


def split_pin(spec: str) -> tuple[str, str | None]:
    """``name==1.2`` or conda's ``name=1.2`` -> (normalized name, "1.2"); no version -> None."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:={1,2}\s*([^\s=#;]+))?\s*", spec)
    assert match, f"not a plain pin: {spec!r}"
    return normalize(match.group(1)), match.group(2)


def pyproject_pins() -> dict[str, str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {}
    for spec in extras["book"] + extras["dev"]:
        name, version = split_pin(spec)
        assert version, f"pyproject.toml: {spec!r} in the book/dev extras is not pinned with =="
        pins[name] = version
    return pins


def environment_pins() -> tuple[dict[str, str], dict[str, str | None]]:
    """(pinned packages, other entries such as python) from environment.yml, conda and pip sections."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pins, other = {}, {}
    for entry in env["dependencies"]:
        specs = entry["pip"] if isinstance(entry, dict) else [entry]
        for spec in specs:
            if spec.startswith("-"):  # pip options such as `-e .`
                continue
            name, version = split_pin(spec)
            assert name not in pins, f"environment.yml lists {name} twice"
            (other if name in NOT_PINNED else pins)[name] = version
    return pins, other


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = split_pin(line)
            pins[name] = version
    return pins


def test_normalize_and_split():
    """Names compare in one form; conda's single = and pip's == both give the version."""
    assert split_pin("PyYAML==6.0.3") == ("pyyaml", "6.0.3")
    assert split_pin("pytorch-cpu=2.13.0") == ("torch", "2.13.0")
    assert split_pin("pre_commit==4.7.0") == ("pre-commit", "4.7.0")
    assert split_pin("python-build==1.6.1") == ("build", "1.6.1")
    assert split_pin("pip") == ("pip", None)


def test_environment_yml_has_the_same_packages_and_versions_as_pyproject():
    """environment.yml pins exactly the book and dev extras, at the same versions."""
    pins, _ = environment_pins()
    expected = pyproject_pins()
    assert pins.keys() == expected.keys(), {
        "only in pyproject.toml": sorted(expected.keys() - pins.keys()),
        "only in environment.yml": sorted(pins.keys() - expected.keys()),
    }
    differ = {n: (expected[n], pins[n]) for n in expected if pins[n] != expected[n]}
    assert not differ, f"pyproject.toml vs environment.yml versions: {differ}"


def test_environment_yml_uses_conda_forge_and_the_cpu_torch():
    """conda-forge only, a Python the package supports, and the CPU build of PyTorch."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"][0] == "conda-forge"
    assert set(env["channels"]) <= {"conda-forge", "nodefaults"}
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert any(d.startswith("pytorch-cpu") for d in conda), "torch should come from conda-forge's pytorch-cpu"
    _, other = environment_pins()
    assert other.get("python") and tuple(map(int, other["python"].split(".")[:2])) >= (3, 10)


def test_constraints_agree_with_pyproject():
    """Every direct pin of the book and dev extras has the same version in constraints.txt."""
    locked = constraint_pins()
    expected = pyproject_pins()
    missing = sorted(expected.keys() - locked.keys())
    assert not missing, f"constraints.txt lacks {missing}"
    differ = {n: (v, locked[n]) for n, v in expected.items() if locked[n] != v}
    assert not differ, f"pyproject.toml vs constraints.txt versions: {differ}"
