"""Saving and loading models and training checkpoints, safely and atomically.

Files are written to a temporary name in the same folder, flushed to disk and
renamed over the final name, so a crash never leaves a half-written file
where a good one was. They are read with ``torch.load(weights_only=True)``,
which refuses pickled code, and every failure names the file and the problem.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from vaelib.models import VAE, MLPConfig

__all__ = ["CheckpointError", "atomic_save", "load", "read_checkpoint", "save"]

FORMAT = "vaelib-model"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A model or checkpoint file that cannot be used, with the reason."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a file written by vaelib with ``weights_only=True``; raise ``CheckpointError`` if unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); it was probably cut off while being written")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or unsafe files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: refused to load: the file holds Python objects other than tensors "
                "(it could run code when unpickled); only files saved by vaelib are accepted"
            ) from err
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): {reason}") from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vaelib file (no '{FORMAT}' header)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {obj.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    return obj


def model_record(vae: VAE) -> dict:
    """The architecture and weights of an MLP-built VAE, as plain data."""
    if vae.config is None:
        raise TypeError(
            "vae: save() needs a model built with VAE.mlp, whose architecture it can record; "
            "for custom networks save vae.state_dict() with torch.save instead"
        )
    state = {name: t.detach().cpu() for name, t in vae.state_dict().items()}
    return {"config": vae.config.to_dict(), "state_dict": state, "dtype": str(next(vae.parameters()).dtype)}


def model_from_record(record: dict, path: str | os.PathLike = "<record>") -> VAE:
    """Rebuild a VAE from :func:`model_record` output; errors name ``path``."""
    try:
        config = MLPConfig(**{**record["config"], "hidden": tuple(record["config"]["hidden"])})
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the recorded architecture is invalid: {err}") from err
    vae = VAE.mlp(**config.to_dict())
    dtype = getattr(torch, str(record.get("dtype", "torch.float32")).removeprefix("torch."), torch.float32)
    vae.to(dtype)
    try:
        vae.load_state_dict(record["state_dict"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the weights do not fit the recorded architecture: {err}") from err
    return vae


def save(vae: VAE, path: str | os.PathLike) -> Path:
    """Save a VAE with its architecture, atomically.

    Parameters
    ----------
    vae : VAE
        A model built with :meth:`VAE.mlp`.
    path : path-like
        Destination file; its folder is created if needed.
    """
    return atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "model", **model_record(vae)}, path)


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> VAE:
    """Load a VAE saved by :func:`save` or a training checkpoint written by :func:`vaelib.fit`.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    CheckpointError
        If the file is empty, truncated, corrupt, unsafe to unpickle, not a vaelib
        file, or its weights do not fit its architecture. The message names the file.
    """
    obj = read_checkpoint(path)
    record = obj["model"] if obj.get("kind") == "checkpoint" else obj
    return model_from_record(record, path).to(device)
