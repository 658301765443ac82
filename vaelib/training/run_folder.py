"""The run folder: the files a training run keeps together, and the checks before one is written.

``vaelib train`` writes into one folder per run::

    run.json        the options, written first ({"format": "vaelib-run", ...})
    checkpoint.pt   the model and optimizer after every epoch
    metrics.json    the history, the options and the test scores, at the end
    samples.png     samples and reconstructions, when matplotlib is installed

Every JSON file is written atomically (see :func:`write_json`), so a killed run
never leaves half a file. The benchmarks keep their own runs' state the same
way. :func:`check_out` decides whether a folder may receive a run: a new or
empty folder, or one that already holds a run when it is resumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

from vaelib._io.atomic import atomic_write

__all__ = [
    "CHECKPOINT",
    "LOCK",
    "METRICS",
    "RUN",
    "RUN_FORMAT",
    "SAMPLES",
    "check_out",
    "is_run",
    "read_json",
    "read_run",
    "write_json",
]

RUN, CHECKPOINT, METRICS, SAMPLES = "run.json", "checkpoint.pt", "metrics.json", "samples.png"
LOCK = f".{CHECKPOINT}.lock"  # the lock fit takes on the checkpoint, taken first for the whole folder
RUN_FORMAT = "vaelib-run"  # the "format" entry of run.json


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` to ``path`` as indented JSON with a final newline, atomically.

    Raises
    ------
    vaelib._io.atomic.WriteError
        If the file cannot be written (a full disk); the previous file under that name is intact.
    """

    def write(f: BinaryIO) -> None:
        f.write((json.dumps(obj, indent=2) + "\n").encode())

    atomic_write(path, write)


def read_json(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    """The JSON object in ``path``, or ``default`` when there is no such file."""
    if not path.is_file():
        return default
    obj: dict[str, Any] = json.loads(path.read_text())
    return obj


def read_run(path: Path) -> dict[str, Any]:
    """The options in a run file ``path`` (a ``run.json`` written by ``vaelib train``).

    Raises
    ------
    FileNotFoundError
        If there is no such file; the message asks whether the folder is a run.
    ValueError
        If the file is not JSON, or not an object with the ``vaelib-run`` header and a ``data`` entry.
    """
    try:
        config = json.loads(path.read_text())
        if not (isinstance(config, dict) and config.get("format") == RUN_FORMAT and "data" in config):
            raise ValueError(f"no '{RUN_FORMAT}' header")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; is {path.parent} a folder written by 'vaelib train'?") from None
    except ValueError as err:  # also json.JSONDecodeError
        raise ValueError(f"{path}: not a run file of 'vaelib train' ({err})") from err
    return config


def is_run(out: Path) -> bool:
    """Whether the folder ``out`` holds a run of 'vaelib train' (a run file or a checkpoint)."""
    if (out / CHECKPOINT).exists():
        return True
    try:
        read_run(out / RUN)
    except (OSError, ValueError):
        return False
    return True


def check_out(out: Path, text: str, resume: bool) -> None:
    """Check the folder ``out`` (given as ``text``, the ``--out`` option) before a run is written into it.

    A folder that does not exist yet, or one holding nothing but the lock and
    temporaries of a run's files, is fine; a folder holding a run is fine only
    with ``resume``.

    Raises
    ------
    ValueError
        For an empty name, a file, a folder of other things, and an existing run without ``resume``.
    """
    if not text.strip():
        raise ValueError("--out: expected a folder name, got an empty string")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a folder")
    if not out.is_dir():
        return
    if is_run(out):
        if not resume:
            raise ValueError(
                f"{out} already holds a run ({out / CHECKPOINT if (out / CHECKPOINT).exists() else out / RUN}); "
                "add --resume to continue it or choose another --out"
            )
        if (out / CHECKPOINT).exists() and not (out / CHECKPOINT).is_file():
            raise ValueError(f"--resume: {out / CHECKPOINT} is a folder, not a checkpoint file")
        return
    ours = (RUN, CHECKPOINT, METRICS, SAMPLES)
    others = sorted(
        p.name
        for p in out.iterdir()
        if not (p.name == LOCK or any(p.name.startswith(f".{name}.") and p.name.endswith(".tmp") for name in ours))
    )
    if others:
        raise ValueError(
            f"--out: {out} is not empty and not a run of 'vaelib train' (it holds {', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); choose a new or empty folder"
        )
