"""The arguments of :func:`~vaelib.training.fit.fit`: the checks that span several, and the keywords it no longer takes.

``fit`` once took its objective's settings as keywords (``k``, ``beta``, ...); each of
those, and the other keywords folded into one, now raises a ``TypeError`` that names
what replaces it, so code written for the earlier ``fit`` fails with directions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from vaelib.training.callbacks import Callback, EarlyStopping
from vaelib.training.history import History

__all__ = ["IF_EXISTS", "IfExists", "check_checkpoint_path", "checked_callbacks", "with_directions"]

IfExists = Literal["error", "resume", "overwrite"]
IF_EXISTS = ("error", "resume", "overwrite")


def check_checkpoint_path(path: Path | None, if_exists: str) -> None:
    if if_exists == "resume" and path is None:
        raise ValueError("if_exists: 'resume' needs a checkpoint path to resume from")
    if path is not None and path.is_dir():
        raise ValueError(f"checkpoint: {path} is a folder; expected the path of a checkpoint file")
    if path is not None and path.exists() and if_exists == "error":
        raise ValueError(
            f"checkpoint: {path} already exists; pass if_exists='resume' to continue it "
            "or if_exists='overwrite' to replace it"
        )


# Keywords of earlier versions, and what replaces each: a call with one fails with directions.
_REMOVED = {
    "k": "objective=vaelib.IWAE(k={v}) (or vaelib.ELBO(k={v})): the objective carries its k",
    "analytic_kl": "objective=vaelib.ELBO(analytic_kl={v})",
    "estimator": "objective=vaelib.IWAE(k=5, estimator={v})",
    "beta": "objective=vaelib.BetaELBO(beta={v})",
    "kl_warmup_epochs": "objective=vaelib.BetaELBO(warmup_epochs={v})",
    "kl_schedule": "objective=vaelib.BetaELBO(schedule=...)",
    "free_bits": "objective=vaelib.BetaELBO(free_bits={v})",
    "valid_k": "valid_objective=vaelib.IWAE(k={v})",
    "callback": "callbacks=[f]",
    "patience": "callbacks=[vaelib.EarlyStopping(patience={v})]",
    "restore_best": "callbacks=[vaelib.EarlyStopping(patience=math.inf, restore_best_weights=True)]",
    "loader_workers": "train_x=torch.utils.data.DataLoader(data, num_workers={v})",
    "resume": "if_exists='resume'",
    "overwrite": "if_exists='overwrite'",
    "matmul_precision": "with vaelib.training_precision({v}): fit(...)",
}


def with_directions(fn: Callable[..., History]) -> Callable[..., History]:
    """``fit`` that answers a keyword of an earlier version with a ``TypeError`` naming its replacement."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> History:
        removed = [key for key in kwargs if key in _REMOVED]
        if removed:
            told = (
                f"{key}= is no longer a keyword; use {_REMOVED[key].format(v=repr(kwargs[key]))}" for key in removed
            )
            raise TypeError("fit: " + "; ".join(told))
        return fn(*args, **kwargs)

    return wrapper


def checked_callbacks(
    callbacks: Sequence[Callback | Callable[[History], object]] | None, has_valid: bool
) -> list[Callback | Callable[[History], object]]:
    out = list(callbacks or [])
    for cb in out:
        if not (isinstance(cb, Callback) or callable(cb)):
            raise TypeError(f"callbacks: expected Callbacks or functions of the history, got {type(cb).__name__}")
        if isinstance(cb, EarlyStopping) and cb.monitor == "valid_bound" and not has_valid:
            raise ValueError("valid_x: EarlyStopping watches the validation bound; give valid_x")
    return out
