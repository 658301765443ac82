"""Callbacks: what :func:`~vaelib.training.fit.fit` does beyond the loop, with control over it.

A callback follows Keras's protocol. :func:`~vaelib.training.fit.fit` first hands
every callback the run's :class:`TrainState` (``set_state``), then calls
``on_train_begin(logs)``, ``on_epoch_end(epoch, logs)`` after each completed
epoch, and ``on_train_end(logs)`` however training ends. ``on_epoch_end``
returns ``True`` to stop: training then ends cleanly after that epoch, the
history is kept and returned, and ``History.stopped`` names the callback.
Bounds are maximized, so a higher score is better (Ignite's rule) and there
is no ``mode``.

``logs`` holds ``epoch``, ``train_bound``, ``seconds``, ``lr`` and, in the
epochs that were validated, ``valid_bound`` (nats per data point). There are
no per-batch hooks: reading a value per step would make the host wait for the
device at every step.

A plain function ``f(history)`` is accepted wherever a callback is, and is
called after every epoch; returning ``True`` stops training.

References
----------
Chollet et al., Keras, ``keras/src/callbacks/{callback,early_stopping,csv_logger}.py``;
PyTorch-Ignite, ``ignite/handlers/early_stopping.py``.
"""

from __future__ import annotations

import copy
import csv
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from vaelib._checks import check_nonnegative_int
from vaelib.training.history import History

__all__ = [
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EarlyStopping",
    "LambdaCallback",
    "TensorBoard",
    "TrainState",
]

Logs = dict[str, Any]


@dataclass
class TrainState:
    """What a callback may look at (and change) during :func:`~vaelib.training.fit.fit`.

    Attributes
    ----------
    vae : torch.nn.Module
        The model being trained.
    optimizer : torch.optim.Optimizer
    history : History
        The record so far; the same object ``fit`` returns.
    scheduler : object, optional
        The learning-rate scheduler, if ``fit`` was given one.
    """

    vae: torch.nn.Module
    optimizer: torch.optim.Optimizer
    history: History
    scheduler: Any = None

    @property
    def epoch(self) -> int:
        """The number of completed epochs."""
        return len(self.history)


class Callback:
    """Base class: override the hooks you need; each default does nothing and does not stop."""

    state: TrainState | None = None

    def set_state(self, state: TrainState) -> None:
        self.state = state

    def on_train_begin(self, logs: Logs | None = None) -> None:
        """Called once, before the first epoch of this call of ``fit`` (also when resuming)."""

    def on_epoch_end(self, epoch: int, logs: Logs) -> bool:
        """Called after each completed epoch (and after its checkpoint); return ``True`` to stop."""
        return False

    def on_train_end(self, logs: Logs | None = None) -> None:
        """Called once when training ends: all epochs done, a stop, Ctrl-C or an error."""


class LambdaCallback(Callback):
    """Adapts a plain function ``f(history)`` (the ``callback=`` of earlier versions) to a callback."""

    def __init__(self, fn: Callable[[History], object]) -> None:
        if not callable(fn):
            raise TypeError(f"callbacks: expected a Callback or a callable, got {type(fn).__name__}")
        self.fn = fn

    def on_epoch_end(self, epoch: int, logs: Logs) -> bool:
        assert self.state is not None
        return self.fn(self.state.history) is True

    def __repr__(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


class CallbackList:
    """The callbacks of one run, called in order; every one is called even when an earlier one stops."""

    def __init__(self, callbacks: Iterable[Callback | Callable[[History], object]], state: TrainState) -> None:
        self.callbacks = [c if isinstance(c, Callback) else LambdaCallback(c) for c in callbacks]
        for c in self.callbacks:
            c.set_state(state)
        self.stopped_by: str | None = None

    def on_train_begin(self, logs: Logs) -> None:
        for c in self.callbacks:
            c.on_train_begin(logs)

    def on_epoch_end(self, epoch: int, logs: Logs) -> bool:
        votes = [bool(c.on_epoch_end(epoch, logs)) for c in self.callbacks]  # a list: all are called
        if any(votes) and self.stopped_by is None:
            self.stopped_by = repr(self.callbacks[votes.index(True)])
        return any(votes)

    def on_train_end(self, logs: Logs) -> None:
        for c in self.callbacks:
            c.on_train_end(logs)


class EarlyStopping(Callback):
    """Stop when the monitored bound has not risen by ``min_delta`` for ``patience`` validations.

    Parameters
    ----------
    monitor : str
        A key of the epoch's logs; ``"valid_bound"`` by default. Epochs where it
        is absent (no validation that epoch) are skipped.
    patience : int or float
        Validations without improvement before stopping; ``math.inf`` never
        stops (to keep only the best weights).
    min_delta : float
        The least rise that counts as an improvement, in nats.
    restore_best_weights : bool
        At the end of training, load the weights of the best epoch into the model.
    """

    def __init__(
        self,
        monitor: str = "valid_bound",
        patience: float = 0,
        min_delta: float = 0.0,
        restore_best_weights: bool = False,
    ) -> None:
        self.monitor = monitor
        self.patience: float = math.inf if patience == math.inf else check_nonnegative_int(patience, "patience")
        if not math.isfinite(float(min_delta)) or min_delta < 0:
            raise ValueError(f"min_delta: expected a finite number >= 0, got {min_delta}")
        self.min_delta = float(min_delta)
        self.restore_best_weights = bool(restore_best_weights)
        self.best = -math.inf
        self.best_epoch: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.wait = 0

    def __repr__(self) -> str:
        return f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience})"

    def on_train_begin(self, logs: Logs | None = None) -> None:
        self.best, self.best_epoch, self.best_weights, self.wait = -math.inf, None, None, 0

    def on_epoch_end(self, epoch: int, logs: Logs) -> bool:
        score = logs.get(self.monitor)
        if score is None:
            return False
        if score > self.best + self.min_delta:
            self.best, self.best_epoch, self.wait = float(score), epoch, 0
            if self.restore_best_weights:
                assert self.state is not None
                self.best_weights = copy.deepcopy(self.state.vae.state_dict())
            return False
        self.wait += 1
        return self.wait >= self.patience

    def on_train_end(self, logs: Logs | None = None) -> None:
        if self.restore_best_weights and self.best_weights is not None:
            assert self.state is not None
            self.state.vae.load_state_dict(self.best_weights)


class CSVLogger(Callback):
    """Write one row per epoch to a CSV file: epoch, train_bound, valid_bound, seconds, lr.

    Parameters
    ----------
    filename : path-like
    append : bool
        Add to an existing file (no second header) instead of starting afresh;
        use it when resuming a run.
    """

    FIELDS: Sequence[str] = ("epoch", "train_bound", "valid_bound", "seconds", "lr")

    def __init__(self, filename: str | os.PathLike[str], append: bool = False) -> None:
        self.filename = Path(filename)
        self.append = bool(append)
        self._file: IO[str] | None = None
        self._writer: Any = None

    def on_train_begin(self, logs: Logs | None = None) -> None:
        header = not (self.append and self.filename.exists() and self.filename.stat().st_size > 0)
        self.filename.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.filename, "a" if self.append else "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=list(self.FIELDS), extrasaction="ignore")
        if header:
            self._writer.writeheader()

    def on_epoch_end(self, epoch: int, logs: Logs) -> bool:
        if self._writer is not None and self._file is not None:
            self._writer.writerow({key: ("" if logs.get(key) is None else logs[key]) for key in self.FIELDS})
            self._file.flush()
        return False

    def on_train_end(self, logs: Logs | None = None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoard(Callback):
    """Write the bounds, the epoch time and the learning rate to TensorBoard event files.

    Needs the optional ``tensorboard`` package (``pip install tensorboard``);
    the scalars are named ``bound/train``, ``bound/valid``, ``seconds`` and ``lr``.

    Parameters
    ----------
    log_dir : path-like
        Folder of the event files (``tensorboard --logdir`` it).
    """

    def __init__(self, log_dir: str | os.PathLike[str] = "runs") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch raises this when the tensorboard package is missing
            raise ImportError(
                "TensorBoard: the callback needs the optional 'tensorboard' package; "
                "install it with `pip install tensorboard`, or log with CSVLogger instead"
            ) from err
        self.log_dir = Path(log_dir)
        self._writer_class = SummaryWriter
        self._writer: Any = None

    def on_train_begin(self, logs: Logs | None = None) -> None:
        self._writer = self._writer_class(log_dir=str(self.log_dir))

    def on_epoch_end(self, epoch: int, logs: Logs) -> bool:
        if self._writer is None:
            return False
        self._writer.add_scalar("bound/train", logs["train_bound"], epoch)
        if logs.get("valid_bound") is not None:
            self._writer.add_scalar("bound/valid", logs["valid_bound"], epoch)
        self._writer.add_scalar("seconds", logs["seconds"], epoch)
        self._writer.add_scalar("lr", logs["lr"], epoch)
        self._writer.flush()
        return False

    def on_train_end(self, logs: Logs | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
