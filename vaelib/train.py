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
import functools
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from vaelib._checks import (
    check_bool,
    check_choice,
    check_data,
    check_nonnegative_int,
    check_positive_float,
    check_positive_int,
    check_seed,
)
from vaelib._io.lock import exclusive
from vaelib._runtime.devices import MatmulPrecision, fit_precision, float32_matmul_precision, resolve_device
from vaelib._runtime.progress import progress_bar, progress_enabled
from vaelib._runtime.thread_policy import matmul_work
from vaelib._runtime.threads import StepThreads
from vaelib.data import bernoulli_draw
from vaelib.models import VAE
from vaelib.objectives import (
    Objective,
    epoch_objective,
    label,
    qualified_name,
    resolve,
    samples_per_point,
    settings_of,
    validation_objective,
)
from vaelib.training.batches import ResidentBatches, StreamedBatches, batch_source
from vaelib.training.callbacks import Callback, CallbackList, EarlyStopping, TrainState
from vaelib.training.checkpoint import read_training_checkpoint, write_training_checkpoint
from vaelib.training.distributed import all_sum, broadcast, init_from_env, rank_and_world_size, rank_seed, wrap
from vaelib.training.history import History

__all__ = ["IF_EXISTS", "IfExists", "TrainingDiverged", "fit", "run_settings"]

OptimizerFactory = Callable[[Iterator[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]

DEFAULT_LR = 1e-3

logger = logging.getLogger(__name__)


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


def run_settings(objective: Objective, batch_size: int, lr: float | None, seed: int, **extra: object) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (what a checkpoint records).

    The objective's :func:`~vaelib.objectives.settings_of`, the batch size, the learning rate
    of the default optimizer and the seed; ``extra`` options are recorded only when set.
    """
    settings: dict[str, object] = {
        "objective": settings_of(objective),
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
    }
    return settings | {key: value for key, value in extra.items() if value is not None}


IfExists = Literal["error", "resume", "overwrite"]
IF_EXISTS = ("error", "resume", "overwrite")


def _check_checkpoint_path(path: Path | None, if_exists: str) -> None:
    if if_exists == "resume" and path is None:
        raise ValueError("if_exists: 'resume' needs a checkpoint path to resume from")
    if path is not None and path.is_dir():
        raise ValueError(f"checkpoint: {path} is a folder; expected the path of a checkpoint file")
    if path is not None and path.exists() and if_exists == "error":
        raise ValueError(
            f"checkpoint: {path} already exists; pass if_exists='resume' to continue it "
            "or if_exists='overwrite' to replace it"
        )


def _make_optimizer(vae: VAE, lr: float | None, optimizer: OptimizerFactory | None, dev: torch.device) -> Optimizer:
    if optimizer is None:
        return _adam(vae, DEFAULT_LR if lr is None else lr, dev)
    opt = optimizer(vae.parameters())
    if not isinstance(opt, Optimizer):
        raise TypeError(f"optimizer: the factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
    return opt


def _make_scheduler(opt: Optimizer, scheduler: SchedulerFactory | None) -> Any:
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
class _Run:
    """Everything one call of :func:`fit` resolved before the first epoch."""

    vae: VAE
    batches: ResidentBatches | StreamedBatches  # the training rows (vaelib.batches)
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
    rank: int = 0  # this process and the number of processes (vaelib.distributed)
    world_size: int = 1
    ddp: nn.Module | None = None  # the objective wrapped in DistributedDataParallel when world_size > 1


def _step(run: _Run, xb: Tensor, size: int) -> Tensor:
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


def _train_epoch(run: _Run, epoch: int) -> float:
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


def _snapshot(run: _Run) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    sched = copy.deepcopy(run.scheduler.state_dict()) if run.scheduler is not None else None
    return copy.deepcopy(run.vae.state_dict()), copy.deepcopy(run.opt.state_dict()), sched


def _rollback(run: _Run) -> None:
    """Put the model, optimizer and scheduler back as they were at the start of the epoch."""
    if run.snapshot is None:
        return
    model, opt, sched = run.snapshot
    run.vae.load_state_dict(model)
    run.opt.load_state_dict(opt)
    if run.scheduler is not None and sched is not None:
        run.scheduler.load_state_dict(sched)


def _check_diverged(run: _Run, epoch: int, train_bound: float, done: int) -> None:
    # A step can break the weights after the last bound of the epoch was taken.
    if math.isfinite(train_bound) and _all_finite(run.vae):
        return
    _rollback(run)
    kept = f"; the checkpoint {run.path} from epoch {done} is kept" if run.path else ""
    raise TrainingDiverged(
        f"training diverged in epoch {epoch}: the {run.label} bound or the weights became NaN or infinite "
        f"(try a smaller learning rate, or grad_clip); the model is restored to epoch {done}{kept}"
    )


def _validate(run: _Run, epoch: int) -> float | None:
    """The mean validation bound, every ``valid_every`` epochs and after the last one."""
    if run.valid is None or (epoch % run.valid_every and epoch != run.epochs):
        return None
    if run.world_size == 1:
        return float(_mean_bound(run.vae, run.valid, run.valid_objective, run.batch_size))
    part = torch.tensor_split(run.valid, run.world_size)[run.rank]  # each rank scores its share
    return float(all_sum(_sum_bound(run.vae, part, run.valid_objective, run.batch_size))) / run.valid.shape[0]


def _scheduler_step(run: _Run, score: float) -> None:
    if run.scheduler is None:
        return
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(-score)  # it watches a loss: the negated bound
    else:
        run.scheduler.step()


def _report(run: _Run, history: History, bar: Any) -> None:
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


def _logs(run: _Run, history: History) -> dict[str, Any]:
    logs: dict[str, Any] = {
        "epoch": history.epoch[-1],
        "train_bound": history.train_bound[-1],
        "seconds": history.seconds[-1],
        "lr": float(run.opt.param_groups[0]["lr"]),
    }
    if history.valid_bound[-1] is not None:
        logs["valid_bound"] = history.valid_bound[-1]
    return logs


def _run_epoch(run: _Run, history: History, epoch: int, callbacks: CallbackList, bar: Any) -> bool:
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


def _open_checkpoint(run: _Run, history: History, if_exists: str) -> tuple[History, contextlib.ExitStack]:
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
                _check_checkpoint_path(path, if_exists)
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


def _interrupted(run: _Run, history: History, epoch: int) -> None:
    """Ctrl-C: keep the last completed epoch (also during the epoch's checkpoint write, which is rolled back)."""
    if run.snapshot is not None:
        _rollback(run)
        history.truncate(epoch - 1)
    history.interrupted = True
    warnings.warn(
        f"fit: interrupted during epoch {epoch}; the model is as it was after epoch {len(history)}", stacklevel=3
    )


def _prepare_valid(
    vae: VAE, valid_x: Tensor, dev: torch.device, dtype: torch.dtype, binarize: bool, seed: int
) -> Tensor:
    valid = valid_x.to(dev, dtype)
    if binarize:
        valid = bernoulli_draw(valid, torch.Generator(device=dev).manual_seed(seed))
    return valid


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


def _directions(fn: Callable[..., History]) -> Callable[..., History]:
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


def _checked_callbacks(
    callbacks: Sequence[Callback | Callable[[History], object]] | None, has_valid: bool
) -> list[Callback | Callable[[History], object]]:
    out = list(callbacks or [])
    for cb in out:
        if not (isinstance(cb, Callback) or callable(cb)):
            raise TypeError(f"callbacks: expected Callbacks or functions of the history, got {type(cb).__name__}")
        if isinstance(cb, EarlyStopping) and cb.monitor == "valid_bound" and not has_valid:
            raise ValueError("valid_x: EarlyStopping watches the validation bound; give valid_x")
    return out


def _prepare(vae: VAE, train_x: Any, o: dict[str, Any]) -> _Run:
    """Check ``fit``'s arguments (as the dictionary ``o``), place model and data, build the optimizer."""
    if not isinstance(vae, VAE):
        raise TypeError(f"vae: expected a vaelib.VAE, got {type(vae).__name__}")
    if not any(p.requires_grad for p in vae.parameters()):
        raise ValueError("vae: the model has no trainable parameters (its encoder and decoder hold none)")
    objective = resolve(o["objective"])
    valid_objective = validation_objective(objective)
    if o["valid_objective"] is not None:
        valid_objective = resolve(o["valid_objective"], "valid_objective")
    epochs = check_nonnegative_int(o["epochs"], "epochs")
    batch_size = check_positive_int(o["batch_size"], "batch_size")
    lr = None if o["lr"] is None else check_positive_float(o["lr"], "lr")
    if lr is not None and o["optimizer"] is not None:
        raise ValueError("lr: set the learning rate inside the optimizer factory, not both")
    grad_clip = None if o["grad_clip"] is None else check_positive_float(o["grad_clip"], "grad_clip")
    seed = check_seed(o["seed"], "seed")
    check_choice(o["if_exists"], "if_exists", IF_EXISTS)
    bernoulli = vae.likelihood == "bernoulli"
    binarize = bernoulli if o["binarize"] is None else check_bool(o["binarize"], "binarize")
    if binarize and not bernoulli:
        raise ValueError("binarize: dynamic binarization applies to a Bernoulli likelihood only")
    valid_every = check_positive_int(o["valid_every"], "valid_every")
    valid_x = o["valid_x"]
    if isinstance(valid_x, Tensor) and valid_x.requires_grad:
        raise ValueError("valid_x: expected data that do not require grad; pass valid_x.detach()")
    if valid_x is not None:
        valid_x = check_data(valid_x, "valid_x", event_shape=vae.x_shape, likelihood=vae.likelihood)
    path = Path(o["checkpoint"]) if o["checkpoint"] is not None else None
    _check_checkpoint_path(path, o["if_exists"])
    dev = init_from_env(resolve_device(o["device"]))  # under torchrun: join the process group; cuda:LOCAL_RANK
    dtype = next(vae.parameters()).dtype
    source = batch_source(
        train_x, device=dev, dtype=dtype, event_shape=vae.x_shape, likelihood=vae.likelihood, stream=o["stream"]
    )
    rank, world_size = rank_and_world_size()
    if batch_size % world_size:
        raise ValueError(f"batch_size: the global batch of {batch_size} rows does not split among {world_size} ranks")
    vae.to(dev)
    opt = _make_optimizer(vae, lr, o["optimizer"], dev)
    extra = {
        "optimizer": qualified_name(o["optimizer"]) if o["optimizer"] is not None else None,
        "scheduler": qualified_name(o["scheduler"]) if o["scheduler"] is not None else None,
        "grad_clip": grad_clip,
        "binarize": binarize if binarize != bernoulli else None,
    }
    default_lr = DEFAULT_LR if o["optimizer"] is None and lr is None else lr
    return _Run(
        vae=vae,
        batches=source,
        valid=None if valid_x is None else _prepare_valid(vae, valid_x, dev, dtype, binarize, seed),
        objective=objective,
        base_objective=objective,
        valid_objective=valid_objective,
        opt=opt,
        scheduler=_make_scheduler(opt, o["scheduler"]),
        batch_size=batch_size,
        binarize=binarize,
        grad_clip=grad_clip,
        matmul_precision=fit_precision(),
        seed=seed,
        dev=dev,
        valid_every=valid_every,
        epochs=epochs,
        path=path,
        settings=run_settings(objective, batch_size, default_lr, seed, **extra),
        label=label(objective),
        rank=rank,
        world_size=world_size,
    )


@_directions
def fit(
    vae: VAE,
    train_x: Tensor | np.ndarray | Dataset[Any] | DataLoader[Any],
    *,
    objective: Literal["elbo", "iwae"] | Objective = "elbo",
    epochs: int = 10,
    batch_size: int = 100,
    lr: float | None = None,
    optimizer: OptimizerFactory | None = None,
    scheduler: SchedulerFactory | None = None,
    grad_clip: float | None = None,
    binarize: bool | None = None,
    valid_x: Tensor | np.ndarray | None = None,
    valid_objective: Objective | None = None,
    valid_every: int = 1,
    callbacks: Sequence[Callback | Callable[[History], object]] | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    if_exists: IfExists = "error",
    device: str | torch.device = "auto",
    progress: bool | None = None,
    stream: bool | None = None,
) -> History:
    """Train ``vae`` by stochastic gradient ascent on a bound: the ELBO, the IWAE bound or one of your own.

    Each step minimizes :math:`-\\frac{1}{B}\\sum_{b} \\mathcal{L}(x_b)` over a batch of
    ``batch_size`` rows, where :math:`\\mathcal{L}(x_b)` is ``objective(vae, x_b)``.

    Parameters
    ----------
    vae : VAE
        The model; it is moved to ``device`` and trained in place.
    train_x : Tensor, ndarray, torch.utils.data.Dataset or torch.utils.data.DataLoader
        Training data of shape ``(n, *x_shape)``, in [0, 1] for a Bernoulli likelihood. A
        map-style data set's items are rows (or pairs whose first element is the row); of a
        DataLoader only its data set and its ``num_workers`` (for streamed batches) are used.
    objective : {"elbo", "iwae"}, an objective value or a function
        What to maximize: :class:`vaelib.ELBO`, :class:`vaelib.IWAE`, :class:`vaelib.BetaELBO`,
        :class:`vaelib.Renyi` (see :mod:`vaelib.objectives`), or a function ``(vae, x) -> (batch,)``.
        ``"elbo"`` is ``vaelib.ELBO()`` and ``"iwae"`` is ``vaelib.IWAE()`` (k = 5).
    epochs : int
        Total number of passes over the data (a resumed run counts those done).
    batch_size : int
        Rows per step, all processes together: under ``torchrun`` each of :math:`R` ranks
        takes ``batch_size / R`` rows of every batch (a multiple of :math:`R` is required),
        and the step follows the mean over the whole batch (see :mod:`vaelib.distributed`).
    lr : float, optional
        Learning rate of the default optimizer, fused Adam (1e-3 if not given).
    optimizer : callable, optional
        A factory ``params -> torch.optim.Optimizer``, e.g.
        ``lambda p: torch.optim.SGD(p, lr=0.1)``; then ``lr`` is not used.
    scheduler : callable, optional
        A factory ``optimizer -> LR scheduler``, stepped once after every epoch
        (a ``ReduceLROnPlateau`` is given the negated validation bound, or training bound).
    grad_clip : float, optional
        Clip the gradients' total 2-norm to this value before each step.
    binarize : bool, optional
        Dynamic binarization (Burda et al. 2015, section 5): each batch is
        drawn afresh as Bernoulli(x). On by default for a Bernoulli likelihood;
        ``False`` trains on the values as they are (a cross-entropy for grey ones).
    valid_x : Tensor or ndarray, optional
        Held-out data (binarized once, from ``seed``, when ``binarize`` is on).
    valid_objective : objective, optional
        The bound ``valid_x`` is scored with: by default the objective's own
        (``for_validation()``: the ELBO for a :class:`~vaelib.objectives.BetaELBO`).
    valid_every : int
        Score ``valid_x`` every this many epochs, and after the last epoch.
    callbacks : list, optional
        :class:`~vaelib.callbacks.Callback` objects or plain functions ``f(history)``;
        any of them returning ``True`` after an epoch stops training cleanly. Early
        stopping and keeping the best weights: ``vaelib.EarlyStopping(patience=3,
        restore_best_weights=True)``.
    seed : int
        Seeds every random choice (an integer in [0, 2**64 - 1]); a CPU run repeats exactly.
    checkpoint : path-like, optional
        File written atomically after every epoch (see :func:`vaelib.checkpoint.atomic_save`),
        and at once if ``epochs`` is 0: a process killed at any moment leaves the previous
        epoch's file intact. The file is locked for the run (a second process training into
        it is refused with the first one's pid; a lock left by a dead process is taken over).
    if_exists : {"error", "resume", "overwrite"}
        What to do with an existing ``checkpoint``, decided under its lock: refuse it
        (``"error"``), continue from it (``"resume"``: the run then ends with the same weights
        as an uninterrupted one; it starts afresh if there is no file; callbacks start afresh),
        or start afresh and replace it (``"overwrite"``).
    device : str or torch.device
        ``"auto"`` picks CUDA, then MPS, then the CPU.
    progress : bool, optional
        Show a progress bar; by default only in a terminal or a live notebook.
        Without a bar each epoch is logged in one line to the ``vaelib.train``
        logger at level INFO.
    stream : bool, optional
        Stream batches from the host (``True``) or hold the data on the device (``False``);
        by default resident when the data fit half of the device's free memory
        (:mod:`vaelib.batches`). Both read the same batches: a CPU run ends with the same weights.

    Returns
    -------
    vaelib.history.History
        Per-epoch training bound, validation bound and seconds. After a
        ``KeyboardInterrupt`` it holds the epochs completed, ``interrupted`` is
        set and the model is as it was at the end of the last completed epoch.
        After a stop by a callback, ``stopped`` names it.

    Raises
    ------
    TrainingDiverged
        If the bound or the weights become NaN or infinite; the message names the
        epoch, the model is restored to the previous epoch and the last checkpoint
        (which only ever holds finite weights) is kept.
    vaelib.checkpoint.CheckpointError
        With ``if_exists="resume"``, if the checkpoint is unreadable, was written with
        another objective or other settings (both are named) or for another architecture,
        or holds NaN or infinite weights; nothing is changed.
    vaelib.checkpoint.WriteError
        If a checkpoint cannot be written (a full disk); the previous one is intact.
    vaelib.checkpoint.RunLocked
        If another live process is training into ``checkpoint``; its pid is in the message.
    TypeError
        For a keyword of an earlier version (``k``, ``beta``, ``resume``, ...): the message
        names what replaces it, e.g. ``objective=vaelib.IWAE(k=5)``.
    ValueError
        Also if ``checkpoint`` exists and ``if_exists`` is ``"error"``, or if the checkpoint
        already holds more than ``epochs`` epochs.

    Notes
    -----
    The training steps multiply float32 matrices at the precision of
    :func:`vaelib.training_precision` (``"medium"`` unless set).

    References
    ----------
    Kingma and Ba (2015), "Adam"; Kingma and Welling (2013), algorithm 1.
    """
    options = dict(locals())
    run = _prepare(vae, train_x, options)
    cbs = _checked_callbacks(callbacks, run.valid is not None)
    k = samples_per_point(run.base_objective)
    history, lock = _open_checkpoint(run, History(objective=run.label, k=k), if_exists)
    if run.world_size > 1:  # after the checkpoint is read: rank 0's weights go to every rank
        run.ddp = wrap(vae, run.objective, run.dev)
    callback_list = CallbackList(cbs, TrainState(vae, run.opt, history, run.scheduler))
    show = progress_enabled(progress) and run.rank == 0
    bar = progress_bar(show, total=run.epochs, initial=len(history), desc=f"fit {run.label} k={k}", unit="epoch")
    try:
        # On a CPU, each step runs on one thread or on torch's count, whichever is faster
        # now (vaelib.threads); the caller's count is restored on the way out.
        with (
            torch.random.fork_rng(devices=[run.dev] if run.dev.type == "cuda" else []),
            StepThreads(run.dev, matmul_work(vae, run.batch_size * k)) as run.threads,
        ):
            callback_list.on_train_begin({"epoch": len(history)})
            for epoch in range(len(history) + 1, run.epochs + 1):
                try:
                    if _run_epoch(run, history, epoch, callback_list, bar):
                        history.stopped = callback_list.stopped_by
                        break
                except KeyboardInterrupt:
                    _interrupted(run, history, epoch)
                    return history
    finally:
        if bar is not None:
            bar.close()
        callback_list.on_train_end({"epoch": len(history)})
        vae.eval()
        lock.close()
        run.batches.close()
    return history
