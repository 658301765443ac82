"""The training loop behind :func:`vaelib.training.fit.fit`: one run's state, its epochs and its checkpoint.

The loop is written for accelerators. Model and data move to the device once;
each epoch draws a random permutation on the device and slices batches from
it (no DataLoader, no per-batch host-to-device copies); Bernoulli data are
re-binarized per batch (dynamic binarization, Burda et al. 2015, section 5);
and the host reads the running bound once per epoch, so the device never
waits for Python between steps. The training steps multiply matrices at the
precision of :func:`vaelib.training_precision <vaelib._runtime.devices.training_precision>`
(``"medium"`` unless set): TF32
tensor cores on a GPU, bfloat16 AMX tiles on a recent Intel CPU, float32 sums
and results either way. The Monte Carlo noise of a gradient step is far larger
than the rounding, and ``benchmarks/throughput.py`` checks that the trained
models score the same held-out bound as models trained in float32.

Every epoch seeds the random number generators from ``(seed, epoch)`` inside
``torch.random.fork_rng``: a run is repeatable, a resumed run ends exactly
where an uninterrupted one does (bitwise on a CPU), and the caller's global
random state is left untouched.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from vaelib._io.lock import exclusive
from vaelib._runtime.devices import MatmulPrecision, float32_matmul_precision
from vaelib._runtime.threads import StepThreads
from vaelib.data import bernoulli_draw
from vaelib.models import VAE
from vaelib.objectives import (
    Objective,
    epoch_objective,
)
from vaelib.training.arguments import check_checkpoint_path
from vaelib.training.batches import ResidentBatches, StreamedBatches
from vaelib.training.callbacks import CallbackList
from vaelib.training.checkpoint import read_training_checkpoint, write_training_checkpoint
from vaelib.training.distributed import all_sum, broadcast, rank_seed
from vaelib.training.history import History

__all__ = [
    "DEFAULT_LR",
    "OptimizerFactory",
    "Run",
    "SchedulerFactory",
    "TrainingDiverged",
    "interrupted",
    "make_optimizer",
    "make_scheduler",
    "open_checkpoint",
    "prepare_valid",
    "run_epoch",
]


OptimizerFactory = Callable[[Iterator[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]

DEFAULT_LR = 1e-3

logger = logging.getLogger("vaelib.training")  # fit's one line per epoch without a progress bar


class TrainingDiverged(FloatingPointError):
    """The training bound became NaN or infinite; the model is restored to the last good epoch."""


def _adam(vae: VAE, lr: float, dev: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel (one kernel for all parameters) where this torch has it."""
    if dev.type in ("cuda", "cpu"):
        try:
            return torch.optim.Adam(vae.parameters(), lr=lr, fused=True)
        except (RuntimeError, TypeError):  # torch older than 2.4 has no fused Adam on the CPU
            pass
    return torch.optim.Adam(vae.parameters(), lr=lr)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Distinct, reproducible seeds per epoch; the constant is a large prime.
    return (seed * 1_000_003 + epoch) % (2**63)


def make_optimizer(vae: VAE, lr: float | None, optimizer: OptimizerFactory | None, dev: torch.device) -> Optimizer:
    if optimizer is None:
        return _adam(vae, DEFAULT_LR if lr is None else lr, dev)
    opt = optimizer(vae.parameters())
    if not isinstance(opt, Optimizer):
        raise TypeError(f"optimizer: the factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
    return opt


def make_scheduler(opt: Optimizer, scheduler: SchedulerFactory | None) -> Any:
    if scheduler is None:
        return None
    sched = scheduler(opt)
    if not (callable(getattr(sched, "step", None)) and callable(getattr(sched, "state_dict", None))):
        raise TypeError(f"scheduler: the factory must return an LR scheduler, got {type(sched).__name__}")
    return sched


@torch.no_grad()
def _sum_bound(vae: VAE, x: Tensor, objective: Objective, batch_size: int) -> Tensor:
    total = torch.zeros((), device=x.device, dtype=x.dtype)
    for i in range(0, x.shape[0], batch_size):
        total += objective(vae, x[i : i + batch_size]).sum()
    return total


def _mean_bound(vae: VAE, x: Tensor, objective: Objective, batch_size: int) -> Tensor:
    return _sum_bound(vae, x, objective, batch_size) / x.shape[0]


def _all_finite(vae: VAE) -> bool:
    """Whether every parameter is finite (one host sync)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in vae.parameters()]).all())


@dataclass
class Run:
    """Everything one call of :func:`~vaelib.training.fit.fit` resolved before the first epoch."""

    vae: VAE
    batches: ResidentBatches | StreamedBatches  # the training rows (vaelib.training.batches)
    valid: Tensor | None  # binarized once when binarize is on
    objective: Objective  # this epoch's (the given objective's for_epoch)
    base_objective: Objective  # as given to fit
    valid_objective: Objective
    opt: Optimizer
    scheduler: Any
    batch_size: int
    binarize: bool
    grad_clip: float | None
    matmul_precision: MatmulPrecision
    seed: int
    dev: torch.device
    valid_every: int
    epochs: int
    path: Path | None
    settings: dict[str, Any]
    label: str
    snapshot: tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None] | None = (
        None  # set while an epoch is part-way through
    )
    threads: StepThreads | None = None  # the CPU thread policy of the steps, set by fit
    rank: int = 0  # this process and the number of processes (vaelib.training.distributed)
    world_size: int = 1
    ddp: nn.Module | None = None  # the objective wrapped in DistributedDataParallel when world_size > 1


def _step(run: Run, xb: Tensor, size: int) -> Tensor:
    """One gradient step on the batch (this rank's ``xb`` of ``size`` rows); returns ``xb``'s summed bound."""
    weight = run.world_size / size  # DDP averages over the ranks: the mean over the whole batch
    if xb.shape[0] == 0:  # no share of a last batch shorter than the rank count: a stand-in of weight 0
        xb, weight = xb.new_zeros((1, *xb.shape[1:])), 0.0
    b = run.objective(run.vae, xb) if run.ddp is None else run.ddp(xb)  # (rows,)
    if b.shape != xb.shape[:1]:
        raise ValueError(f"objective: expected a bound per data point of shape ({xb.shape[0]},), got {tuple(b.shape)}")
    run.opt.zero_grad(set_to_none=True)
    if run.ddp is None:
        (-b.mean()).backward()
    else:
        (-b.sum() * weight).backward()
    if run.grad_clip is not None:
        # foreach clipping scales on the device: no host sync
        torch.nn.utils.clip_grad_norm_(run.vae.parameters(), run.grad_clip, foreach=True)
    run.opt.step()
    return b.detach().sum() if weight > 0 else b.detach().sum() * 0.0


def _train_epoch(run: Run, epoch: int) -> float:
    """One pass over the data in a fresh random order; the mean training bound (the epoch's one host sync)."""
    seed = _epoch_seed(run.seed, epoch)
    torch.manual_seed(seed)
    run.objective = epoch_objective(run.base_objective, epoch)  # a schedule such as KL warm-up
    if run.ddp is not None:
        run.ddp.module.objective = run.objective  # type: ignore[union-attr]
    run.vae.train()
    n = run.batches.n
    total = torch.zeros((), device=run.dev, dtype=next(run.vae.parameters()).dtype)
    perm = torch.randperm(n, device=run.dev)
    if run.world_size > 1:
        broadcast(perm)  # one order for all ranks
        torch.manual_seed(rank_seed(seed, run.rank))  # and noise of its own for each
    batches = run.batches.epoch(perm, run.batch_size, run.rank, run.world_size, seed=seed)
    with float32_matmul_precision(run.matmul_precision):
        for xb, size in batches:  # (rows, *event_shape)
            with run.threads.step() if run.threads is not None else contextlib.nullcontext():
                if run.binarize:
                    xb = bernoulli_draw(xb)
                total += _step(run, xb, size)
    run.vae.eval()
    return float(total if run.world_size == 1 else all_sum(total)) / n


def _snapshot(run: Run) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    sched = copy.deepcopy(run.scheduler.state_dict()) if run.scheduler is not None else None
    return copy.deepcopy(run.vae.state_dict()), copy.deepcopy(run.opt.state_dict()), sched


def _rollback(run: Run) -> None:
    """Put the model, optimizer and scheduler back as they were at the start of the epoch."""
    if run.snapshot is None:
        return
    model, opt, sched = run.snapshot
    run.vae.load_state_dict(model)
    run.opt.load_state_dict(opt)
    if run.scheduler is not None and sched is not None:
        run.scheduler.load_state_dict(sched)


def _check_diverged(run: Run, epoch: int, train_bound: float, done: int) -> None:
    # A step can break the weights after the last bound of the epoch was taken.
    if math.isfinite(train_bound) and _all_finite(run.vae):
        return
    _rollback(run)
    kept = f"; the checkpoint {run.path} from epoch {done} is kept" if run.path else ""
    raise TrainingDiverged(
        f"training diverged in epoch {epoch}: the {run.label} bound or the weights became NaN or infinite "
        f"(try a smaller learning rate, or grad_clip); the model is restored to epoch {done}{kept}"
    )


def _validate(run: Run, epoch: int) -> float | None:
    """The mean validation bound, every ``valid_every`` epochs and after the last one."""
    if run.valid is None or (epoch % run.valid_every and epoch != run.epochs):
        return None
    if run.world_size == 1:
        return float(_mean_bound(run.vae, run.valid, run.valid_objective, run.batch_size))
    part = torch.tensor_split(run.valid, run.world_size)[run.rank]  # each rank scores its share
    return float(all_sum(_sum_bound(run.vae, part, run.valid_objective, run.batch_size))) / run.valid.shape[0]


def _scheduler_step(run: Run, score: float) -> None:
    if run.scheduler is None:
        return
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(-score)  # it watches a loss: the negated bound
    else:
        run.scheduler.step()


def _report(run: Run, history: History, bar: Any) -> None:
    """The progress bar in a terminal or notebook; one ``logging`` line per epoch elsewhere."""
    train_bound, seconds = history.train_bound[-1], history.seconds[-1]
    if run.rank != 0:
        return
    if bar is not None:
        bar.update(1)
        bar.set_postfix(bound=f"{train_bound:.2f}", s=f"{seconds:.2f}")
        return
    valid = history.valid_bound[-1]
    valid_text = f", valid {valid:.3f}" if valid is not None else ""
    logger.info(
        "epoch %d/%d: train %s %.3f%s nats, %.2f s",
        history.epoch[-1],
        run.epochs,
        run.label,
        train_bound,
        valid_text,
        seconds,
    )


def _logs(run: Run, history: History) -> dict[str, Any]:
    logs: dict[str, Any] = {
        "epoch": history.epoch[-1],
        "train_bound": history.train_bound[-1],
        "seconds": history.seconds[-1],
        "lr": float(run.opt.param_groups[0]["lr"]),
    }
    if history.valid_bound[-1] is not None:
        logs["valid_bound"] = history.valid_bound[-1]
    return logs


def run_epoch(run: Run, history: History, epoch: int, callbacks: CallbackList, bar: Any) -> bool:
    """Train, check, validate, record, checkpoint, report; return whether a callback asks to stop."""
    run.snapshot = _snapshot(run)
    start = time.perf_counter()
    train_bound = _train_epoch(run, epoch)
    _check_diverged(run, epoch, train_bound, len(history))
    valid_bound = _validate(run, epoch)
    _scheduler_step(run, train_bound if valid_bound is None else valid_bound)
    history.append(epoch, train_bound, valid_bound, time.perf_counter() - start)
    if run.path is not None and run.rank == 0:
        write_training_checkpoint(run.path, run.vae, run.opt, history, run.settings, run.scheduler)
    run.snapshot = None  # the epoch is complete, and on disk
    _report(run, history, bar)
    return callbacks.on_epoch_end(epoch, _logs(run, history))


def open_checkpoint(run: Run, history: History, if_exists: str) -> tuple[History, contextlib.ExitStack]:
    """Lock the checkpoint for the run, and read it when resuming; the lock is returned to be released.

    Whether the file may be replaced is decided again under the lock: another run may have
    finished into it while this one was preparing.
    """
    lock = contextlib.ExitStack()
    path = run.path
    try:
        if path is not None:
            if run.rank == 0:  # rank 0 writes the file; every rank reads it
                lock.enter_context(exclusive(path.with_name(f".{path.name}.lock"), f"the checkpoint {path}"))
                check_checkpoint_path(path, if_exists)
            if if_exists == "resume" and path.exists():
                history = read_training_checkpoint(
                    path, run.vae, run.opt, run.settings, epochs=run.epochs, scheduler=run.scheduler
                )
            if run.epochs == 0 and len(history) == 0 and run.rank == 0:  # a run of 0 epochs has its file too
                write_training_checkpoint(path, run.vae, run.opt, history, run.settings, run.scheduler)
    except BaseException:
        lock.close()
        raise
    return history, lock


def interrupted(run: Run, history: History, epoch: int) -> None:
    """Ctrl-C: keep the last completed epoch (also during the epoch's checkpoint write, which is rolled back)."""
    if run.snapshot is not None:
        _rollback(run)
        history.truncate(epoch - 1)
    history.interrupted = True
    warnings.warn(
        f"fit: interrupted during epoch {epoch}; the model is as it was after epoch {len(history)}", stacklevel=3
    )


def prepare_valid(
    vae: VAE, valid_x: Tensor, dev: torch.device, dtype: torch.dtype, binarize: bool, seed: int
) -> Tensor:
    valid = valid_x.to(dev, dtype)
    if binarize:
        valid = bernoulli_draw(valid, torch.Generator(device=dev).manual_seed(seed))
    return valid
