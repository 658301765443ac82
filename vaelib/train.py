"""Training a VAE by stochastic gradient ascent on a bound: :func:`fit`.

The loop is written for accelerators. Model and data move to the device once;
each epoch draws a random permutation on the device and slices batches from
it (no DataLoader, no per-batch host-to-device copies); Bernoulli data are
re-binarized per batch (dynamic binarization, Burda et al. 2015, section 5);
and the host reads the running bound once per epoch, so the device never
waits for Python between steps. Unless told otherwise the training steps
multiply matrices at ``matmul_precision="medium"``: TF32 tensor cores on a
GPU, bfloat16 AMX tiles on a recent Intel CPU, float32 sums and results
either way. The Monte Carlo noise of a gradient step is far larger than the
rounding, and ``benchmarks/throughput.py`` checks that the trained models
score the same held-out bound as models trained in float32.

Every epoch seeds the random number generators from ``(seed, epoch)`` inside
``torch.random.fork_rng``: a run is repeatable, a resumed run ends exactly
where an uninterrupted one does (bitwise on a CPU), and the caller's global
random state is left untouched.

On a CPU the training steps run on one thread or on torch's thread count,
whichever is faster at the moment (a second training beside this one makes
torch's spinning threads slow), unless the caller set the count; the
caller's count is restored afterwards (see :mod:`vaelib.threads`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from vaelib._checks import (
    MATMUL_PRECISIONS,
    OBJECTIVES,
    check_bool,
    check_choice,
    check_data,
    check_nonnegative_int,
    check_positive_float,
    check_positive_int,
    check_seed,
)
from vaelib._lock import exclusive
from vaelib._progress import progress_bar, progress_enabled
from vaelib.checkpoint import read_training_checkpoint, write_training_checkpoint
from vaelib.data import bernoulli_draw
from vaelib.history import History
from vaelib.models import VAE
from vaelib.threads import StepThreads, matmul_work

__all__ = ["TrainingDiverged", "default_device", "fit", "float32_matmul_precision", "resolve_device"]


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


def _adam(vae: VAE, lr: float, dev: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel (one kernel for all parameters) where this torch has it."""
    if dev.type in ("cuda", "cpu"):
        try:
            return torch.optim.Adam(vae.parameters(), lr=lr, fused=True)
        except (RuntimeError, TypeError):  # torch older than 2.4 has no fused Adam on the CPU
            pass
    return torch.optim.Adam(vae.parameters(), lr=lr)


@contextlib.contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """Run the block with ``torch.set_float32_matmul_precision`` at ``precision``, then restore it.

    Parameters
    ----------
    precision : {"highest", "high", "medium"}
        ``"highest"`` computes float32 matrix products in float32 (23 explicit
        mantissa bits); ``"high"`` lets a GPU round the factors to TF32 (10
        bits); ``"medium"`` also lets a CPU with bfloat16 units (Intel AMX)
        round them to bfloat16 (7 bits). Sums and results stay float32, and
        hardware without the fast path computes in float32.

    References
    ----------
    Kalamkar et al. (2019), "A Study of BFLOAT16 for Deep Learning Training";
    NVIDIA (2020), "NVIDIA A100 Tensor Core GPU Architecture" (TF32).
    """
    check_choice(precision, "matmul_precision", MATMUL_PRECISIONS)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


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


def _all_finite(vae: VAE) -> bool:
    """Whether every parameter is finite (one host sync)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in vae.parameters()]).all())


def _restore(vae: VAE, opt: torch.optim.Optimizer, snapshot: tuple[dict, dict]) -> None:
    vae.load_state_dict(snapshot[0])
    opt.load_state_dict(snapshot[1])


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
    overwrite: bool = False,
    matmul_precision: str = "medium",
    progress: bool | None = None,
    callback: Callable[[History], None] | None = None,
) -> History:
    """Train ``vae`` with Adam, maximizing the ELBO or the IWAE bound.

    Each step minimizes :math:`-\\frac{1}{B}\\sum_{b} \\mathcal{L}(x_b)` over a batch
    of ``batch_size`` rows, where :math:`\\mathcal{L}` is
    :meth:`~vaelib.models.VAE.elbo` (``objective="elbo"``) or :meth:`~vaelib.models.VAE.iwae` (``"iwae"``).

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
        For the ELBO, use the closed-form KL to the prior (refused with ``objective="iwae"``).
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
        Seeds every random choice (an integer in [0, 2**64 - 1]); a CPU run repeats exactly.
    checkpoint : path-like, optional
        File written atomically after every epoch (see :func:`vaelib.checkpoint.atomic_save`),
        and at once if ``epochs`` is 0: a process killed at any moment leaves the previous
        epoch's file intact. The file is locked for the run (a second process training into
        it is refused with the first one's pid; a lock left by a dead process is taken over).
    resume : bool
        Continue from ``checkpoint`` if it exists (from scratch if it does not);
        the run then ends with the same weights as an uninterrupted one.
    overwrite : bool
        Start afresh and replace an existing ``checkpoint``; without it (or
        ``resume``), an existing file is refused rather than silently replaced.
    matmul_precision : {"medium", "high", "highest"}
        Internal precision of the float32 matrix products in the training steps
        (see :func:`~vaelib.train.float32_matmul_precision`): ``"medium"`` uses TF32 on a GPU and
        bfloat16 products on a CPU that has fast ones; ``"highest"`` is float32
        throughout. The validation bound and everything outside ``fit`` keep
        the caller's setting.
    progress : bool, optional
        Show a progress bar; by default only in a terminal or a live notebook.
    callback : callable, optional
        Called with the :class:`~vaelib.history.History` after each epoch (and after the checkpoint is written).

    Returns
    -------
    vaelib.history.History
        Per-epoch training bound, validation bound and seconds. After a
        ``KeyboardInterrupt`` it holds the epochs completed, ``interrupted`` is
        set and the model is as it was at the end of the last completed epoch.

    Raises
    ------
    TrainingDiverged
        If the bound or the weights become NaN or infinite; the message names the
        epoch, the model is restored to the previous epoch and the last checkpoint
        (which only ever holds finite weights) is kept.
    vaelib.checkpoint.CheckpointError
        With ``resume=True``, if the checkpoint is unreadable, was written with
        other settings or for another architecture, or holds NaN or infinite
        weights; nothing is changed.
    vaelib.checkpoint.WriteError
        If a checkpoint cannot be written (a full disk); the previous one is intact.
    vaelib.checkpoint.RunLocked
        If another live process is training into ``checkpoint``; its pid is in the message.
    ValueError
        Also if ``checkpoint`` exists and neither ``resume`` nor ``overwrite`` is given, or
        if the checkpoint already holds more than ``epochs`` epochs.

    References
    ----------
    Kingma and Ba (2015), "Adam"; Kingma and Welling (2013), algorithm 1.
    """
    if not isinstance(vae, VAE):
        raise TypeError(f"vae: expected a vaelib.VAE, got {type(vae).__name__}")
    if not any(p.requires_grad for p in vae.parameters()):
        raise ValueError("vae: the model has no trainable parameters (its encoder and decoder hold none)")
    check_choice(objective, "objective", OBJECTIVES)
    check_choice(matmul_precision, "matmul_precision", MATMUL_PRECISIONS)
    k = check_positive_int(k, "k")
    check_bool(analytic_kl, "analytic_kl")
    if analytic_kl and objective != "elbo":
        raise ValueError(f"analytic_kl: the closed-form KL applies to objective='elbo' only, got {objective!r}")
    epochs = check_nonnegative_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_positive_float(lr, "lr")
    seed = check_seed(seed, "seed")
    check_bool(resume, "resume")
    check_bool(overwrite, "overwrite")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a function of the history, got {type(callback).__name__}")
    dev = resolve_device(device)
    for name, data in (("train_x", train_x), ("valid_x", valid_x)):
        if isinstance(data, Tensor) and data.requires_grad:
            raise ValueError(f"{name}: expected data that do not require grad; pass {name}.detach()")
    train_x = check_data(train_x, "train_x", x_dim=vae.x_dim, likelihood=vae.likelihood)
    if valid_x is not None:
        valid_x = check_data(valid_x, "valid_x", x_dim=vae.x_dim, likelihood=vae.likelihood)
    path = Path(checkpoint) if checkpoint is not None else None
    if resume and path is None:
        raise ValueError("resume: resume=True needs a checkpoint path to resume from")
    if resume and overwrite:
        raise ValueError("overwrite: resume=True continues the checkpoint, overwrite=True replaces it; choose one")
    if path is not None and path.is_dir():
        raise ValueError(f"checkpoint: {path} is a folder; expected the path of a checkpoint file")
    if path is not None and path.exists() and not (resume or overwrite):
        raise ValueError(
            f"checkpoint: {path} already exists; pass resume=True to continue it or overwrite=True to replace it"
        )

    vae.to(dev)
    dtype = next(vae.parameters()).dtype
    x = train_x.to(dev, dtype)  # resident on the device for the whole run
    bernoulli = vae.likelihood == "bernoulli"
    if valid_x is not None:
        valid = valid_x.to(dev, dtype)
        if bernoulli:
            g = torch.Generator(device=dev).manual_seed(seed)
            valid = bernoulli_draw(valid, g)
    opt = _adam(vae, lr, dev)
    settings = _settings(objective, k, analytic_kl, batch_size, lr, seed)
    history = History(objective=objective, k=k)

    lock = contextlib.ExitStack()  # released in the finally clause of the loop
    try:
        if path is not None:
            lock.enter_context(exclusive(path.with_name(f".{path.name}.lock"), f"the checkpoint {path}"))
        if resume and path is not None and path.exists():
            history = read_training_checkpoint(path, vae, opt, settings, epochs=epochs)
        if path is not None and epochs == 0 and len(history) == 0:
            write_training_checkpoint(path, vae, opt, history, settings)  # a run of 0 epochs has its file too
    except BaseException:
        lock.close()
        raise

    show = progress_enabled(progress)
    bar = progress_bar(show, total=epochs, initial=len(history), desc=f"fit {objective} k={k}", unit="epoch")
    n = x.shape[0]
    try:
        # On a CPU, each step runs on one thread or on torch's count, whichever is faster
        # now (vaelib.threads); the caller's count is restored on the way out.
        with (
            torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []),
            StepThreads(dev, matmul_work(vae, batch_size * k)) as threads,
        ):
            for epoch in range(len(history) + 1, epochs + 1):
                snapshot = None  # set while the model is part-way through an epoch
                try:
                    snapshot = (copy.deepcopy(vae.state_dict()), copy.deepcopy(opt.state_dict()))
                    start = time.perf_counter()
                    torch.manual_seed(_epoch_seed(seed, epoch))
                    vae.train()
                    total = torch.zeros((), device=dev, dtype=dtype)
                    perm = torch.randperm(n, device=dev)
                    with float32_matmul_precision(matmul_precision):
                        for i in range(0, n, batch_size):
                            with threads.step():
                                xb = x[perm[i : i + batch_size]]  # (batch, x_dim)
                                if bernoulli:
                                    xb = bernoulli_draw(xb)
                                b = bound(vae, xb, objective, k, analytic_kl)  # (batch,)
                                opt.zero_grad(set_to_none=True)
                                (-b.mean()).backward()
                                opt.step()
                                total += b.detach().sum()
                    train_bound = float(total) / n  # the one host sync of the epoch
                    vae.eval()
                    # A step can break the weights after the last bound of the epoch was taken.
                    if not math.isfinite(train_bound) or not _all_finite(vae):
                        _restore(vae, opt, snapshot)
                        kept = f"; the checkpoint {path} from epoch {len(history)} is kept" if path else ""
                        raise TrainingDiverged(
                            f"training diverged in epoch {epoch}: the {objective} bound or the weights became "
                            f"NaN or infinite (try a smaller lr than {lr}); the model is restored to epoch "
                            f"{len(history)}{kept}"
                        )
                    valid_bound = None
                    if valid_x is not None:
                        valid_bound = float(_mean_bound(vae, valid, objective, k, analytic_kl, batch_size))
                    history.append(epoch, train_bound, valid_bound, time.perf_counter() - start)
                    if path is not None:
                        write_training_checkpoint(path, vae, opt, history, settings)
                    snapshot = None  # the epoch is complete, and on disk
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(bound=f"{train_bound:.2f}", s=f"{history.seconds[-1]:.2f}")
                    if callback is not None:
                        callback(history)
                except KeyboardInterrupt:
                    if snapshot is not None:  # also during the epoch's checkpoint write, which is rolled back
                        _restore(vae, opt, snapshot)
                        history.truncate(epoch - 1)
                    history.interrupted = True
                    warnings.warn(
                        f"fit: interrupted during epoch {epoch}; the model is as it was after epoch {len(history)}",
                        stacklevel=2,
                    )
                    return history
    finally:
        if bar is not None:
            bar.close()
        vae.eval()
        lock.close()
    return history
