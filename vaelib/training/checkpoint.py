"""Training checkpoints: what :func:`vaelib.training.fit.fit` writes after every epoch to resume a run exactly.

A checkpoint is a model file (:mod:`vaelib.training.model_file`) that also
holds the optimizer's state (and a scheduler's), the history and the settings
of the run; it is written atomically and, before a resume changes anything,
checked against the model and the settings it is to continue.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import torch

from vaelib.models import VAE
from vaelib.objectives import describe, upgrade_settings
from vaelib.training.history import History
from vaelib.training.model_file import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    first_line,
    model_record,
    read_checkpoint,
    shape_mismatch,
)

__all__ = ["read_training_checkpoint", "verify_training_checkpoint", "write_training_checkpoint"]


def write_training_checkpoint(
    path: str | os.PathLike[str],
    vae: VAE,
    opt: torch.optim.Optimizer,
    history: History,
    settings: dict[str, Any],
    scheduler: Any = None,
) -> Path:
    """Write what :func:`~vaelib.training.fit.fit` needs to resume: weights, optimizer (and scheduler) state,
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


def _refuse_settings(path: Path, saved: Any, now: dict[str, Any]) -> NoReturn:
    """A ``CheckpointError`` naming the objectives and every other setting that differ, both sides."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: its training settings are unreadable ({type(saved).__name__})")
    parts = []
    if saved.get("objective") != now.get("objective"):
        parts.append(f"objective {describe(saved.get('objective'))} then, {describe(now.get('objective'))} now")
    keys = sorted((set(now) | set(saved)) - {"objective"})
    diff = {key: (saved.get(key), now.get(key)) for key in keys if saved.get(key) != now.get(key)}
    if diff:
        parts.append(f"other settings (saved, now): {diff}")
    raise CheckpointError(f"{path}: written with other training settings: {'; '.join(parts)}")


def verify_training_checkpoint(
    path: str | os.PathLike[str],
    vae: VAE,
    settings: dict[str, Any],
    *,
    epochs: int | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Check that the checkpoint at ``path`` can resume training ``vae`` with ``settings``; change nothing.

    Returns the checkpoint's contents, for :func:`read_training_checkpoint`.

    Raises
    ------
    CheckpointError
        If the file is unusable, is a saved model rather than a checkpoint, was
        written with other training settings, for another architecture
        (another activation, say, even where the shapes agree) or parameter
        dtype, or its weights do not fit ``vae``.
    ValueError
        If it already holds more than ``epochs`` epochs.
    """
    path = Path(path)
    saved = read_checkpoint(path)
    if saved.get("kind") != "checkpoint":
        raise CheckpointError(f"{path}: a saved model, not a training checkpoint; cannot resume from it")
    recorded = upgrade_settings(saved["settings"]) if isinstance(saved["settings"], dict) else saved["settings"]
    if recorded != settings:
        _refuse_settings(path, recorded, settings)
    record = saved["model"] if isinstance(saved["model"], dict) else {}
    mine = vae.config.to_dict() if vae.config is not None else None
    theirs = record.get("config")
    if mine is not None and theirs != mine:
        arch_diff: object = (
            {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            if isinstance(theirs, dict)
            else theirs
        )
        raise CheckpointError(f"{path}: written for another architecture (saved, now): {arch_diff}")
    dtype = str(vae._dtype())
    if record.get("dtype", dtype) != dtype:
        raise CheckpointError(f"{path}: written for {record.get('dtype')} parameters, but the model's are {dtype}")
    state = record.get("state_dict")
    here = vae.state_dict()
    if not isinstance(state, dict) or set(state) != set(here):
        raise CheckpointError(f"{path}: the checkpoint holds the weights of another kind of model")
    mismatch = shape_mismatch(state, here)
    if mismatch is not None:
        name, shape, expected = mismatch
        raise CheckpointError(
            f"{path}: the checkpoint's model has another shape: {name} is {shape} there, {expected} here"
        )
    if epochs is not None and isinstance(saved["epoch"], int) and saved["epoch"] > epochs:
        raise ValueError(
            f"epochs: {path} already holds {saved['epoch']} epochs, more than the {epochs} asked for; "
            f"ask for {saved['epoch']} or more to continue it"
        )
    if scheduler is not None and not isinstance(saved.get("scheduler"), dict):
        raise CheckpointError(f"{path}: the checkpoint holds no learning-rate scheduler state to resume")
    return saved


def read_training_checkpoint(
    path: str | os.PathLike[str],
    vae: VAE,
    opt: torch.optim.Optimizer,
    settings: dict[str, Any],
    *,
    epochs: int | None = None,
    scheduler: Any = None,
) -> History:
    """Restore ``vae``, ``opt`` (and ``scheduler``) from a checkpoint of :func:`~vaelib.training.fit.fit`;
    return its history.

    Raises
    ------
    CheckpointError, ValueError
        As :func:`verify_training_checkpoint`. Nothing is changed in that case.
    """
    path = Path(path)
    saved = verify_training_checkpoint(path, vae, settings, epochs=epochs, scheduler=scheduler)
    try:
        history = History.from_dict(saved["history"])
        opt.load_state_dict(saved["optimizer"])  # checks its groups before changing anything
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        vae.load_state_dict(saved["model"]["state_dict"])  # cannot fail: names and shapes were checked
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the checkpoint is damaged: {first_line(err)}") from err
    return history
