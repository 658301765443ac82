"""What :func:`~vaelib.training.fit.fit` records: one row per epoch, and a plot of it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["History"]


@dataclass
class History:
    """Per-epoch training record of :func:`~vaelib.training.fit.fit`.

    Attributes
    ----------
    objective : str
        ``"elbo"`` or ``"iwae"``.
    k : int
        Importance samples per data point.
    epoch : list of int
        Epoch numbers, from 1.
    train_bound, valid_bound : list of float
        Mean bound per data point in nats (higher is better); ``valid_bound``
        holds ``None`` where no validation data was given.
    seconds : list of float
        Wall time of each epoch.
    interrupted : bool
        Set when a ``KeyboardInterrupt`` stopped training early.
    stopped : str, optional
        The callback that stopped training early (e.g. ``EarlyStopping``), or ``None``.
    """

    objective: str = "elbo"
    k: int = 1
    epoch: list[int] = field(default_factory=list)
    train_bound: list[float] = field(default_factory=list)
    valid_bound: list[float | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    interrupted: bool = False
    stopped: str | None = None

    def __len__(self) -> int:
        return len(self.epoch)

    def append(self, epoch: int, train_bound: float, valid_bound: float | None, seconds: float) -> None:
        self.epoch.append(epoch)
        self.train_bound.append(train_bound)
        self.valid_bound.append(valid_bound)
        self.seconds.append(seconds)

    def truncate(self, epochs: int) -> None:
        """Keep only the first ``epochs`` rows (an epoch rolled back after an interruption)."""
        for column in (self.epoch, self.train_bound, self.valid_bound, self.seconds):
            del column[epochs:]

    def to_dict(self) -> dict[str, Any]:
        """The columns and flags as a plain dict (what a checkpoint stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        """The inverse of :meth:`History.to_dict`; raises ``TypeError`` or ``ValueError`` for anything else."""
        if not isinstance(d, dict):
            raise TypeError(f"history: expected a dict, got {type(d).__name__}")
        h = cls(**d)
        n = len(h.epoch)
        if any(not isinstance(c, list) or len(c) != n for c in (h.epoch, h.train_bound, h.valid_bound, h.seconds)):
            raise ValueError("history: its columns are not lists of one length")
        if h.epoch != list(range(1, n + 1)):
            raise ValueError(f"history: epochs are not 1, 2, ..., {n}")
        return h

    def plot(self, ax: Axes | None = None) -> Axes:
        """Draw the training (and validation) bound against the epoch."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError(
                "History.plot needs matplotlib: install it with `pip install matplotlib` "
                "(or `pip install vaelib[plot]`)"
            ) from err

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        labels = {"elbo": "ELBO", "iwae": f"IWAE bound (k={self.k})"}
        label = labels.get(self.objective, self.objective)
        ax.plot(self.epoch, self.train_bound, label=f"train {label}")
        if any(v is not None for v in self.valid_bound):
            epochs = [e for e, v in zip(self.epoch, self.valid_bound, strict=True) if v is not None]
            values = [v for v in self.valid_bound if v is not None]
            ax.plot(epochs, values, label=f"validation {label}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("bound per data point (nats)")
        ax.legend()
        ax.grid(alpha=0.3)
        return ax
