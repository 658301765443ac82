"""vaelib as a reader gets it: a wheel, and a fresh virtual environment holding it.

Shared by ``test_colab.py`` and ``test_package.py``, which each wrap these in a
session-scoped fixture; the wheel and the environment are built once per test
session, in temporary directories away from the checkout, so nothing from the
repository can leak into what they test. The environment (about a gigabyte,
mostly PyTorch) is removed when the test process exits.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What a notebook needs besides vaelib: what Colab has preinstalled, plus the
# kernel and the client that runs it here.
NOTEBOOK_PACKAGES = ("torch", "numpy", "tqdm", "matplotlib", "ipykernel", "nbclient")

# Not part of a source distribution: builds, caches, environments.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "_build",
    ".cache",
    "node_modules",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    ".jupyter_cache",
    ".ipynb_checkpoints",
    "runs",
    ".data",
    ".whl",
    "mathjax",
)

_cache: dict[str, Path] = {}


def pinned(names: tuple[str, ...] = NOTEBOOK_PACKAGES) -> list[str]:
    """``name==version`` for each of ``names``, versions from ``constraints.txt``."""
    versions = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            versions[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    missing = [n for n in names if n not in versions]
    if missing:
        raise AssertionError(f"constraints.txt pins no version of {missing}")
    return [f"{n}=={versions[n]}" for n in names]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process that must not see this checkout or its .venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def run(cmd: list[str | Path], *, cwd: Path, timeout: float, env: dict[str, str] | None = None):
    """Run ``cmd``; on failure, fail the test with its output."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def build_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build vaelib's wheel from a copy of the source tree; return the ``.whl`` path."""
    if "wheel" not in _cache:
        work = tmp_path_factory.mktemp("wheel")
        src, out = work / "src", work / "dist"
        shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
        run([sys.executable, "-m", "build", "--wheel", "--outdir", out, src], cwd=work, timeout=600)
        wheels = sorted(out.glob("vaelib-*.whl"))
        assert len(wheels) == 1, f"expected one vaelib wheel, found {[w.name for w in wheels]}"
        _cache["wheel"] = wheels[0]
    return _cache["wheel"]


def reader_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel and the notebook packages; return its python."""
    if "python" not in _cache:
        wheel = build_wheel(tmp_path_factory)
        env_dir = Path(tempfile.mkdtemp(prefix="vaelib-reader-"))
        atexit.register(shutil.rmtree, env_dir, ignore_errors=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
        python = env_dir / "bin" / "python"
        install = [python, "-m", "pip", "install", "--quiet", "--no-compile"]
        run([*install, wheel, *pinned(), "-c", ROOT / "constraints.txt"], cwd=env_dir, timeout=900)
        _cache["python"] = python
    return _cache["python"]
