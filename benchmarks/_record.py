"""What every benchmark records: the machine, the versions, the commit, the date.

A record is one JSON object written to ``benchmarks/results/<name>-<device-slug>.json``
(``--out`` picks another folder), with the keys ``benchmark``, ``device`` (as
torch names it), ``device_name`` (the CPU model or the GPU's name), ``torch``,
``commit``, ``date`` and the benchmark's own figures.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    """A human-readable name: ``torch.cuda.get_device_name`` or the CPU model in ``/proc/cpuinfo``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.processor() or platform.machine()})"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_slug(device: torch.device) -> str:
    """A short file-name part: ``cpu``, ``mps``, or the GPU's name up to its model number (``nvidia-h100``)."""
    if device.type != "cuda":
        return device.type
    return gpu_slug(device_name(device))


def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` becomes ``"nvidia-h100"``: lower-case words up to the first with a digit."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    kept = []
    for w in words:
        kept.append(w)
        if any(c.isdigit() for c in w):
            break
    return "-".join(kept) or "cuda"


def commit() -> str | None:
    """``git rev-parse HEAD`` of the repository, or ``None`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``), where the system has them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def header(benchmark: str, device: torch.device) -> dict[str, Any]:
    """The keys every record starts with."""
    return {
        "benchmark": benchmark,
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command(benchmark, sys.argv[1:]),
    }


# Options whose values are paths on the machine that ran the benchmark: the
# record keeps a placeholder, so it reads the same wherever it was made.
_PATH_OPTIONS = {
    "--data-dir": "DIR",
    "--out": "DIR",
    "--checkpoint-dir": "DIR",
    "--toc": "FILE",
    "--clone": "DIR",
    "--repo": "DIR",
}


def command(benchmark: str, argv: list[str]) -> str:
    """The command line that made a record, with path values replaced by placeholders."""
    words = ["python", "-m", f"benchmarks.{benchmark}"]
    hide = None
    for arg in argv:
        if hide is not None:
            words.append(hide)
            hide = None
        elif arg in _PATH_OPTIONS:
            words.append(arg)
            hide = _PATH_OPTIONS[arg]
        elif arg.split("=", 1)[0] in _PATH_OPTIONS and "=" in arg:
            option = arg.split("=", 1)[0]
            words.append(f"{option}={_PATH_OPTIONS[option]}")
        else:
            words.append(arg)
    return " ".join(words)


def write(
    benchmark: str,
    figures: dict[str, Any],
    device: torch.device,
    *,
    name: str | None = None,
    out: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], Path]:
    """Write :func:`header` plus ``figures`` as ``<out>/<name>-<device-slug>.json``.

    ``name`` defaults to ``benchmark``, or ``<benchmark>-<data>`` when the figures
    were taken on a data set other than MNIST (``figures["data"]``). Returns the
    record and the path.
    """
    if name is None:
        data = figures.get("data", "mnist")
        name = benchmark if data == "mnist" else f"{benchmark}-{data}"
    record = {**header(benchmark, device), **figures}
    folder = Path(out) if out is not None else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{device_slug(device)}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return record, path


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` so a wall clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run ``fn`` and return its result and its wall time in seconds, the device's queue included."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start
