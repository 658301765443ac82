"""Model files: saving and loading a model, safely and atomically, and reading any file vaelib wrote.

The training checkpoints of :func:`vaelib.training.fit.fit` are model files with the
optimizer's state and the history beside the weights
(:mod:`vaelib.training.checkpoint`).

Files are written to a temporary name in the same folder, flushed to disk and
renamed over the final name, so a crash never leaves a half-written file
where a good one was, and a failed write (a full disk) says that the previous
file is intact. Before a file is loaded, the sizes of its archive's members,
the shapes of its tensors and its recorded architecture are checked against
one another and against limits, without reading a weight or building a
model (see ``vaelib._io.archive``); then it is read with
``torch.load(weights_only=True)``, which refuses pickled code, and its
weights must be finite. Every failure names the file and the problem.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from vaelib._io import archive as model_archive
from vaelib._io.atomic import atomic_write
from vaelib._runtime.devices import resolve_device
from vaelib.models import VAE

__all__ = ["CheckpointError", "atomic_save", "load", "model_from_record", "model_record", "read_checkpoint", "save"]

FORMAT = "vaelib-model"
FORMAT_VERSION = 1
_CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "history", "settings")


class CheckpointError(ValueError):
    """A model or checkpoint file that cannot be used, with the reason."""


def atomic_save(obj: Any, path: str | os.PathLike[str], *, what: str = "checkpoint") -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`~vaelib._io.atomic.atomic_write`).

    The archive is built in memory and then written, so a failing file system
    raises :class:`~vaelib._io.atomic.WriteError` rather than an error from inside torch's writer.
    """

    def write(f: BinaryIO) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        f.write(buffer.getbuffer())

    return atomic_write(path, write, what=what)


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


def _inspect(path: Path) -> Any:
    """The file's object with tensors as shapes (see ``vaelib._io.archive``), or a CheckpointError."""
    try:
        return model_archive.inspect(path)
    except model_archive.UnsafeGlobal as err:
        raise CheckpointError(
            f"{path}: refused to load: the file holds a Python object ({err.name}) that could run code "
            "when unpickled; only tensors and plain data saved by vaelib are accepted"
        ) from None
    except model_archive.ArchiveError as err:
        raise CheckpointError(f"{path}: not a readable checkpoint (crafted, truncated or corrupt): {err}") from None
    except Exception as err:  # BadZipFile, and others for archives broken in odd ways
        raise CheckpointError(
            f"{path}: not a readable checkpoint: not a PyTorch zip archive "
            f"(truncated, corrupt, or another kind of file: {first_line(err)})"
        ) from err


def _check_header(path: Path, obj: Any) -> None:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vaelib file (no '{FORMAT}' header)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {obj.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    if obj.get("kind") == "checkpoint" and not all(key in obj for key in _CHECKPOINT_KEYS):
        missing = [key for key in _CHECKPOINT_KEYS if key not in obj]
        raise CheckpointError(f"{path}: an incomplete training checkpoint (missing {', '.join(missing)})")


def _checked(path: Path, check: Callable[..., Any], *args: Any) -> Any:
    """``check(*args)``, with its ``ArchiveError`` turned into a ``CheckpointError`` naming ``path``."""
    try:
        return check(*args)
    except model_archive.ArchiveError as err:
        raise CheckpointError(f"{path}: {err}") from None


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a file written by vaelib with ``weights_only=True``; raise ``CheckpointError`` if unusable.

    Before any tensor is read, the zip archive's members must be stored
    uncompressed and within size limits, each tensor must fit its member, and a
    recorded architecture must have at most 2**28 parameters
    and imply exactly the tensors' shapes; so a crafted file is refused in
    memory bounded by its own size.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    CheckpointError
        If the path is a folder, the file is empty, not a PyTorch zip archive
        (truncated, corrupt or another kind of file), has compressed or
        oversized members, fails the CRC-32 check of its members, holds
        pickled objects other than plain data, lacks vaelib's header, records
        an architecture its weights do not fit, or holds NaN or infinite
        weights. The message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); it was probably cut off while being written")
    shapes = _inspect(path)
    # torch's reader skips the CRC-32 of each member, so a flipped bit is caught only here.
    with zipfile.ZipFile(path) as archive:
        damaged = archive.testzip()  # reads member by member in small chunks
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged: the bytes of {damaged!r} do not match their stored CRC-32 checksum")
    _check_header(path, shapes)
    if shapes.get("kind") == "checkpoint":
        _checked(path, model_archive.check_record, shapes["model"])
    elif shapes.get("kind") == "model":
        _checked(path, model_archive.check_record, shapes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the error below says all there is to say
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or unsafe files
        raise _load_error(path, err) from err
    _check_header(path, obj)
    bad = model_archive.nonfinite({key: obj.get(key) for key in ("model", "optimizer", "state_dict")})
    if bad is not None:
        raise CheckpointError(
            f"{path}: holds NaN or infinite values ({bad}); the run that wrote it had diverged, "
            "so it cannot be loaded or resumed"
        )
    checked: dict[str, Any] = obj
    return checked


def model_record(vae: VAE) -> dict[str, Any]:
    """The architecture and weights of a VAE as plain data (``config`` is ``None`` for custom networks)."""
    state = {name: t.detach().cpu() for name, t in vae.state_dict().items()}
    config = vae.config.to_dict() if vae.config is not None else None
    return {"config": config, "state_dict": state, "dtype": str(vae._dtype())}


def model_from_record(record: dict[str, Any], path: str | os.PathLike[str] = "<record>") -> VAE:
    """Rebuild a VAE from :func:`model_record` output; errors name ``path``.

    The recorded architecture is checked against limits and against the
    shapes of the weights before the model is built.
    """
    if not isinstance(record, dict) or record.get("config") is None:
        raise CheckpointError(
            f"{path}: holds no architecture (a model with networks of your own); "
            "build the model and pass it: vaelib.load(path, model=vae)"
        )
    config = _checked(Path(path), model_archive.check_record, record)  # before anything is built
    dtype = model_archive.DTYPES[str(record.get("dtype", "torch.float32"))]
    vae = model_archive.build(config).to(dtype)
    try:
        vae.load_state_dict(record["state_dict"])
    except (KeyError, RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: the weights do not fit the recorded architecture: {first_line(err)}") from err
    return vae


def first_line(err: BaseException) -> str:
    """The first two non-empty lines of an error's message, joined: a one-line reason."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else type(err).__name__


def save(vae: VAE, path: str | os.PathLike[str]) -> Path:
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


def shape_mismatch(state: dict[str, Any], here: dict[str, torch.Tensor]) -> tuple[str, object, tuple[int, ...]] | None:
    """The first tensor of ``state`` whose shape differs from ``here``'s: its name, saved shape and own shape."""
    """The first entry of ``state`` (same names as ``here``) that is not a tensor of ``here``'s shape.

    Returns ``(name, what the file holds, the shape wanted)``, or None when every shape agrees.
    """
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or t.shape != here[name].shape:
            return name, tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__, tuple(here[name].shape)
    return None


def _load_into(model: torch.nn.Module, record: dict[str, Any], path: str | os.PathLike[str]) -> None:
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
    mismatch = shape_mismatch(state, mine)
    if mismatch is not None:
        name, shape, expected = mismatch
        raise CheckpointError(
            f"{path}: the weights do not fit the model: {name} is {shape} in the file, {expected} in the model"
        )
    model.load_state_dict(state)


def load(path: str | os.PathLike[str], *, model: VAE | None = None, device: str | torch.device | None = None) -> VAE:
    """Load a VAE saved by :func:`save` or a training checkpoint written by :func:`~vaelib.training.fit.fit`.

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
        If the file is empty, truncated, corrupt, crafted, unsafe to unpickle, not
        a vaelib file, holds NaN or infinite weights, or its weights do not fit
        its architecture (or ``model``). The message names the file.
    ValueError
        If ``device`` is not a device of this machine (checked first).
    """

    if model is not None and not isinstance(model, VAE):
        raise TypeError(f"model: expected a vaelib.VAE to load the weights into, got {type(model).__name__}")
    dev = resolve_device(device) if device is not None else None
    obj = read_checkpoint(path)
    record = obj["model"] if obj.get("kind") == "checkpoint" else obj
    if model is None:
        return model_from_record(record, path).to(dev if dev is not None else "cpu")
    _load_into(model, record, path)
    return model.to(dev) if dev is not None else model
