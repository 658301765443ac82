"""Training a VAE by stochastic gradient ascent on a bound: :func:`fit`.

The loop is written for accelerators. Model and data move to the device once;
each epoch draws a random permutation on the device and slices batches from
it (no DataLoader, no per-batch host-to-device copies); Bernoulli data are
re-binarized per batch (dynamic binarization, Burda et al. 2015, section 5);
and the host reads the running bound once per epoch, so the device never
waits for Python between steps.

Every epoch seeds the random number generators from ``(seed, epoch)`` inside
``torch.random.fork_rng``: a run is repeatable, a resumed run ends exactly
where an uninterrupted one does (bitwise on a CPU), and the caller's global
random state is left untouched.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from vaelib._checks import (
    OBJECTIVES,
    check_choice,
    check_data,
    check_nonnegative_int,
    check_positive_float,
    check_positive_int,
)
from vaelib._progress import progress_bar, progress_enabled
from vaelib.checkpoint import FORMAT, FORMAT_VERSION, atomic_save, read_checkpoint
from vaelib.history import History
from vaelib.models import VAE

__all__ = ["TrainingDiverged", "default_device", "fit", "resolve_device"]


class TrainingDiverged(FloatingPointError):
    """The training bound became NaN or infinite; the model is restored to the last good epoch."""


def default_device() -> torch.device:
    """The fastest device available: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` becomes :func:`default_device`; anything else must exist on this machine."""
    if isinstance(device, str) and device == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'mps', got {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for, but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {device!r} was asked for, but MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'mps', got {device!r}")
    return dev


def bound(vae: VAE, x: Tensor, objective: str, k: int, analytic_kl: bool) -> Tensor:
    """The training objective for a batch, shape (batch,)."""
    if objective == "iwae":
        return vae.iwae(x, k=k)
    return vae.elbo(x, k=k, analytic_kl=analytic_kl)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Distinct, reproducible seeds per epoch; the constant is a large prime.
    return (seed * 1_000_003 + epoch) % (2**63)


def _settings(objective: str, k: int, analytic_kl: bool, batch_size: int, lr: float, seed: int) -> dict:
    return {
        "objective": objective,
        "k": k,
        "analytic_kl": analytic_kl,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
    }


@torch.no_grad()
def _mean_bound(vae: VAE, x: Tensor, objective: str, k: int, analytic_kl: bool, batch_size: int) -> Tensor:
    total = torch.zeros((), device=x.device, dtype=x.dtype)
    for i in range(0, x.shape[0], batch_size):
        total += bound(vae, x[i : i + batch_size], objective, k, analytic_kl).sum()
    return total / x.shape[0]


def _write_checkpoint(path: Path, vae: VAE, opt: torch.optim.Optimizer, history: History, settings: dict) -> None:
    state = {name: t.detach().cpu() for name, t in vae.state_dict().items()}
    model = {
        "config": vae.config.to_dict() if vae.config is not None else None,
        "state_dict": state,
        "dtype": str(next(vae.parameters()).dtype),
    }
    atomic_save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "checkpoint",
            "model": model,
            "optimizer": opt.state_dict(),
            "epoch": len(history),
            "history": history.to_dict(),
            "settings": settings,
        },
        path,
    )


def fit(
    vae: VAE,
    train_x: Tensor,
    *,
    objective: str = "elbo",
    k: int = 1,
    analytic_kl: bool = False,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    valid_x: Tensor | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool | None = None,
    callback: Callable[[History], None] | None = None,
) -> History:
    """Train ``vae`` with Adam, maximizing the ELBO or the IWAE bound.

    Each step minimizes :math:`-\\frac{1}{B}\\sum_{b} \\mathcal{L}(x_b)` over a batch
    of ``batch_size`` rows, where :math:`\\mathcal{L}` is
    :meth:`VAE.elbo` (``objective="elbo"``) or :meth:`VAE.iwae` (``"iwae"``).

    Parameters
    ----------
    vae : VAE
        The model; it is moved to ``device`` and trained in place.
    train_x : Tensor, shape (n, x_dim)
        Training data, in [0, 1] for a Bernoulli likelihood (binarized afresh
        for every batch).
    objective : {"elbo", "iwae"}
    k : int
        Importance samples per data point.
    analytic_kl : bool
        For the ELBO, use the closed-form KL to the prior.
    epochs : int
        Total number of passes over the data (a resumed run counts those done).
    batch_size : int
    lr : float
        Adam's learning rate.
    valid_x : Tensor, optional
        Held-out data; its bound is recorded each epoch (binarized once, from ``seed``).
    device : str or torch.device
        ``"auto"`` picks CUDA, then MPS, then the CPU.
    seed : int
        Seeds every random choice; a CPU run repeats exactly.
    checkpoint : path-like, optional
        File written atomically after every epoch.
    resume : bool
        Continue from ``checkpoint`` if it exists.
    progress : bool, optional
        Show a progress bar; by default only in a terminal or a live notebook.
    callback : callable, optional
        Called with the :class:`History` after each epoch.

    Returns
    -------
    History
        Per-epoch training bound, validation bound and seconds. After a
        ``KeyboardInterrupt`` it holds the epochs completed, ``interrupted`` is
        set and the model is as it was at the end of the last completed epoch.

    Raises
    ------
    TrainingDiverged
        If the bound becomes NaN or infinite; the message names the epoch, the
        model is restored to the previous epoch and the last checkpoint is kept.

    References
    ----------
    Kingma and Ba (2015), "Adam"; Kingma and Welling (2013), algorithm 1.
    """
    if not isinstance(vae, VAE):
        raise TypeError(f"vae: expected a vaelib.VAE, got {type(vae).__name__}")
    check_choice(objective, "objective", OBJECTIVES)
    k = check_positive_int(k, "k")
    epochs = check_nonnegative_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_positive_float(lr, "lr")
    dev = resolve_device(device)
    train_x = check_data(train_x, "train_x", x_dim=vae.x_dim, likelihood=vae.likelihood)
    if valid_x is not None:
        valid_x = check_data(valid_x, "valid_x", x_dim=vae.x_dim, likelihood=vae.likelihood)
    if resume and checkpoint is None:
        raise ValueError("resume: resume=True needs a checkpoint path to resume from")

    vae.to(dev)
    dtype = next(vae.parameters()).dtype
    x = train_x.to(dev, dtype)  # resident on the device for the whole run
    bernoulli = vae.likelihood == "bernoulli"
    if valid_x is not None:
        valid = valid_x.to(dev, dtype)
        if bernoulli:
            g = torch.Generator(device=dev).manual_seed(seed)
            valid = torch.bernoulli(valid, generator=g)
    opt = torch.optim.Adam(vae.parameters(), lr=lr, fused=dev.type == "cuda")
    settings = _settings(objective, k, analytic_kl, batch_size, lr, seed)
    history = History(objective=objective, k=k)

    path = Path(checkpoint) if checkpoint is not None else None
    if resume and path is not None and path.exists():
        saved = read_checkpoint(path)
        if saved.get("kind") != "checkpoint":
            raise ValueError(f"resume: {path} is a saved model, not a training checkpoint")
        if saved["settings"] != settings:
            diff = {
                key: (saved["settings"].get(key), value)
                for key, value in settings.items()
                if saved["settings"].get(key) != value
            }
            raise ValueError(f"resume: {path} was written with other settings (saved, now): {diff}")
        try:
            vae.load_state_dict(saved["model"]["state_dict"])
        except RuntimeError as err:
            raise ValueError(f"resume: the weights in {path} do not fit this model: {err}") from err
        opt.load_state_dict(saved["optimizer"])
        history = History.from_dict(saved["history"])

    show = progress_enabled(progress)
    bar = progress_bar(show, total=epochs, initial=len(history), desc=f"fit {objective} k={k}", unit="epoch")
    n = x.shape[0]
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            for epoch in range(len(history) + 1, epochs + 1):
                snapshot = (copy.deepcopy(vae.state_dict()), copy.deepcopy(opt.state_dict()))
                try:
                    start = time.perf_counter()
                    torch.manual_seed(_epoch_seed(seed, epoch))
                    vae.train()
                    total = torch.zeros((), device=dev, dtype=dtype)
                    perm = torch.randperm(n, device=dev)
                    for i in range(0, n, batch_size):
                        xb = x[perm[i : i + batch_size]]  # (batch, x_dim)
                        if bernoulli:
                            xb = torch.bernoulli(xb)
                        b = bound(vae, xb, objective, k, analytic_kl)  # (batch,)
                        opt.zero_grad(set_to_none=True)
                        (-b.mean()).backward()
                        opt.step()
                        total += b.detach().sum()
                    vae.eval()
                    valid_bound = None
                    if valid_x is not None:
                        valid_bound = float(_mean_bound(vae, valid, objective, k, analytic_kl, batch_size))
                    train_bound = float(total) / n  # the one host sync of the epoch
                    if not math.isfinite(train_bound):
                        vae.load_state_dict(snapshot[0])
                        opt.load_state_dict(snapshot[1])
                        kept = f"; the checkpoint {path} from epoch {len(history)} is kept" if path else ""
                        raise TrainingDiverged(
                            f"training diverged in epoch {epoch}: the {objective} bound became {train_bound} "
                            f"(try a smaller lr than {lr}); the model is restored to epoch {len(history)}{kept}"
                        )
                except KeyboardInterrupt:
                    vae.load_state_dict(snapshot[0])
                    opt.load_state_dict(snapshot[1])
                    history.interrupted = True
                    warnings.warn(
                        f"fit: interrupted during epoch {epoch}; the model is as it was after epoch {len(history)}",
                        stacklevel=2,
                    )
                    return history
                history.append(epoch, train_bound, valid_bound, time.perf_counter() - start)
                if path is not None:
                    _write_checkpoint(path, vae, opt, history, settings)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(bound=f"{train_bound:.2f}", s=f"{history.seconds[-1]:.2f}")
                if callback is not None:
                    callback(history)
    finally:
        if bar is not None:
            bar.close()
        vae.eval()
    return history
