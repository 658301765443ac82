"""Saving and loading models and training checkpoints, safely and atomically.

Files are written to a temporary name in the same folder, flushed to disk and
renamed over the final name, so a crash never leaves a half-written file
where a good one was. They are read with ``torch.load(weights_only=True)``,
which refuses pickled code, and every failure names the file and the problem.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from vaelib.history import History
from vaelib.models import VAE, ConvConfig, MLPConfig

__all__ = [
    "CheckpointError",
    "atomic_save",
    "atomic_write",
    "load",
    "read_checkpoint",
    "read_training_checkpoint",
    "save",
    "write_training_checkpoint",
]

FORMAT = "vaelib-model"
FORMAT_VERSION = 1
_DTYPES = {str(t): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "history", "settings")


class CheckpointError(ValueError):
    """A model or checkpoint file that cannot be used, with the reason."""


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; POSIX only (Windows cannot open a folder).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp gives 0o600


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file with ``write(f)`` to a temporary name beside ``path``, then rename it into place.

    A process killed at any moment leaves either the previous file or the new
    one under ``path``, never a partial one; a killed write can only leave a
    hidden ``.NAME.*.tmp`` file beside it. The folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _load_error(path: Path, err: Exception) -> CheckpointError:
    text = str(err)
    unsafe = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        name = (unsafe.group(1) or unsafe.group(2)).rstrip(".")
        return CheckpointError(
            f"{path}: refused to load: the file holds a Python object ({name}) that could run code "
            "when unpickled; only tensors and plain data saved by vaelib are accepted"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in lines if "error" in line.lower() and "Weights only" not in line), None)
    reason = detail or (lines[-1] if lines else type(err).__name__)
    return CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): {reason}")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a file written by vaelib with ``weights_only=True``; raise ``CheckpointError`` if unusable.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    CheckpointError
        If the file is empty, not a PyTorch zip archive (truncated, corrupt or
        another kind of file), fails the CRC-32 check of its members, holds
        pickled objects other than plain data, or lacks vaelib's header. The
        message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); it was probably cut off while being written")
    # torch.save writes a zip archive: a truncated one has lost its central directory, and
    # as torch's reader skips the CRC-32 of each member, a flipped bit is caught only here.
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as err:  # BadZipFile, and others for archives broken in odd ways
        raise CheckpointError(
            f"{path}: not a readable checkpoint: not a PyTorch zip archive "
            f"(truncated, corrupt, or another kind of file: {_first_line(err)})"
        ) from err
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged: the bytes of {damaged!r} do not match their stored CRC-32 checksum")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the error below says all there is to say
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or unsafe files
        raise _load_error(path, err) from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vaelib file (no '{FORMAT}' header)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {obj.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    if obj.get("kind") == "checkpoint" and not all(key in obj for key in _CHECKPOINT_KEYS):
        missing = [key for key in _CHECKPOINT_KEYS if key not in obj]
        raise CheckpointError(f"{path}: an incomplete training checkpoint (missing {', '.join(missing)})")
    return obj


def model_record(vae: VAE) -> dict:
    """The architecture and weights of a VAE as plain data (``config`` is ``None`` for custom networks)."""
    state = {name: t.detach().cpu() for name, t in vae.state_dict().items()}
    config = vae.config.to_dict() if vae.config is not None else None
    return {"config": config, "state_dict": state, "dtype": str(next(vae.parameters()).dtype)}


def model_from_record(record: dict, path: str | os.PathLike = "<record>") -> VAE:
    """Rebuild a VAE from :func:`model_record` output; errors name ``path``."""
    if not isinstance(record, dict) or record.get("config") is None:
        raise CheckpointError(
            f"{path}: holds no architecture (a model with networks of your own); "
            "build the model and pass it: vaelib.load(path, model=vae)"
        )
    try:
        fields = dict(record["config"])
        if fields.pop("kind", "mlp") == "conv":
            conv = ConvConfig(**{**fields, "x_shape": tuple(fields["x_shape"]), "channels": tuple(fields["channels"])})
            build = lambda: VAE.conv(conv.x_shape, conv.z_dim, conv.channels, conv.likelihood)  # noqa: E731
        else:
            mlp = MLPConfig(**{**fields, "hidden": tuple(fields["hidden"])})
            build = lambda: VAE.mlp(**mlp.to_dict())  # noqa: E731
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the recorded architecture is invalid: {err}") from err
    dtype = _DTYPES.get(str(record.get("dtype", "torch.float32")))
    if dtype is None:
        raise CheckpointError(f"{path}: unsupported parameter dtype {record.get('dtype')!r}")
    vae = build().to(dtype)
    try:
        vae.load_state_dict(record["state_dict"])
    except (KeyError, RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: the weights do not fit the recorded architecture: {_first_line(err)}") from err
    return vae


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else type(err).__name__


def write_training_checkpoint(
    path: str | os.PathLike,
    vae: VAE,
    opt: torch.optim.Optimizer,
    history: History,
    settings: dict,
    scheduler: Any = None,
) -> Path:
    """Write what :func:`~vaelib.train.fit` needs to resume: weights, optimizer (and scheduler) state,
    history, settings."""
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "checkpoint",
        "model": model_record(vae),
        "optimizer": opt.state_dict(),
        "epoch": len(history),
        "history": history.to_dict(),
        "settings": settings,
    }
    if scheduler is not None:
        record["scheduler"] = scheduler.state_dict()
    return atomic_save(record, path)


def read_training_checkpoint(
    path: str | os.PathLike, vae: VAE, opt: torch.optim.Optimizer, settings: dict, scheduler: Any = None
) -> History:
    """Restore ``vae`` and ``opt`` from a checkpoint of :func:`~vaelib.train.fit` and return its history.

    Raises
    ------
    CheckpointError
        If the file is unusable, is a saved model rather than a checkpoint, was
        written with other training settings, or its weights do not fit ``vae``.
        Nothing is changed in that case.
    """
    path = Path(path)
    saved = read_checkpoint(path)
    if saved.get("kind") != "checkpoint":
        raise CheckpointError(f"{path}: a saved model, not a training checkpoint; cannot resume from it")
    if saved["settings"] != settings:
        diff = {
            key: (saved["settings"].get(key), value)
            for key, value in settings.items()
            if saved["settings"].get(key) != value
        }
        raise CheckpointError(f"{path}: written with other training settings (saved, now): {diff}")
    state = saved["model"].get("state_dict") if isinstance(saved["model"], dict) else None
    mine = vae.state_dict()
    if not isinstance(state, dict) or set(state) != set(mine):
        raise CheckpointError(f"{path}: the checkpoint holds the weights of another kind of model")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or t.shape != mine[name].shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(
                f"{path}: the checkpoint's model has another shape: {name} is {shape} there, "
                f"{tuple(mine[name].shape)} here"
            )
    if scheduler is not None and not isinstance(saved.get("scheduler"), dict):
        raise CheckpointError(f"{path}: the checkpoint holds no learning-rate scheduler state to resume")
    try:
        history = History.from_dict(saved["history"])
        opt.load_state_dict(saved["optimizer"])  # checks its groups before changing anything
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        vae.load_state_dict(state)  # cannot fail: names and shapes were checked above
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the checkpoint is damaged: {_first_line(err)}") from err
    return history


def save(vae: VAE, path: str | os.PathLike) -> Path:
    """Save a VAE, atomically: its weights, and its architecture when vaelib built it.

    Parameters
    ----------
    vae : VAE
        A model from :meth:`~vaelib.models.VAE.mlp` or :meth:`~vaelib.models.VAE.conv`,
        which :func:`load` rebuilds from the file alone, or one with networks of
        your own, which ``load(path, model=...)`` fills.
    path : path-like
        Destination file; its folder is created if needed.
    """
    if not isinstance(vae, VAE):
        raise TypeError(f"vae: expected a vaelib.VAE, got {type(vae).__name__}")
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "model", **model_record(vae)}
    record["x_shape"] = list(vae.x_shape)  # for the reader's information
    return atomic_save(record, path)


def _load_into(model: torch.nn.Module, record: dict, path: str | os.PathLike) -> None:
    """Load the record's weights into ``model``, after checking names and shapes; errors name ``path``."""
    state = record.get("state_dict")
    mine = model.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the file holds no weights")
    if set(state) != set(mine):
        missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        raise CheckpointError(
            f"{path}: the weights do not fit the model: missing in the file {missing}, not in the model {extra}"
        )
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or t.shape != mine[name].shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(
                f"{path}: the weights do not fit the model: {name} is {shape} in the file, "
                f"{tuple(mine[name].shape)} in the model"
            )
    model.load_state_dict(state)


def load(path: str | os.PathLike, *, model: VAE | None = None, device: str | torch.device | None = None) -> VAE:
    """Load a VAE saved by :func:`save` or a training checkpoint written by :func:`~vaelib.train.fit`.

    Parameters
    ----------
    path : path-like
    model : VAE, optional
        A model you built, of the saved architecture: the weights are loaded
        into it (needed for networks of your own; checked name by name and
        shape by shape).
    device : str or torch.device, optional
        Where to put the model: the CPU for a rebuilt model and the model's own
        device for ``model`` by default.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    CheckpointError
        If the file is empty, truncated, corrupt, unsafe to unpickle, not a vaelib
        file, or its weights do not fit its architecture (or ``model``). The
        message names the file.
    """
    if model is not None and not isinstance(model, VAE):
        raise TypeError(f"model: expected a vaelib.VAE to load the weights into, got {type(model).__name__}")
    obj = read_checkpoint(path)
    record = obj["model"] if obj.get("kind") == "checkpoint" else obj
    if model is None:
        vae = model_from_record(record, path)
        return vae.to(device if device is not None else "cpu")
    _load_into(model, record, path)
    return model.to(device) if device is not None else model
