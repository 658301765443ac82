"""Training a VAE by stochastic gradient ascent on a bound: :func:`fit`.

``fit`` checks its arguments, builds the run (:mod:`vaelib.training.loop`) and
drives its epochs. On a CPU the training steps run on one thread or on torch's
thread count, whichever is faster at the moment (a second training beside this
one makes torch's spinning threads slow), unless the caller set the count; the
caller's count is restored afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
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
from vaelib._runtime.devices import fit_precision, resolve_device
from vaelib._runtime.progress import progress_bar, progress_enabled
from vaelib._runtime.thread_policy import matmul_work
from vaelib._runtime.threads import StepThreads
from vaelib.models import VAE
from vaelib.objectives import (
    Objective,
    label,
    qualified_name,
    resolve,
    samples_per_point,
    settings_of,
    validation_objective,
)
from vaelib.training.arguments import IF_EXISTS, IfExists, check_checkpoint_path, checked_callbacks, with_directions
from vaelib.training.batches import batch_source
from vaelib.training.callbacks import Callback, CallbackList, TrainState
from vaelib.training.distributed import init_from_env, rank_and_world_size, wrap
from vaelib.training.history import History
from vaelib.training.loop import (
    DEFAULT_LR,
    OptimizerFactory,
    Run,
    SchedulerFactory,
    interrupted,
    make_optimizer,
    make_scheduler,
    open_checkpoint,
    prepare_valid,
    run_epoch,
)

__all__ = ["fit", "run_settings"]


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


def _prepare(vae: VAE, train_x: Any, o: dict[str, Any]) -> Run:
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
    check_checkpoint_path(path, o["if_exists"])
    dev = init_from_env(resolve_device(o["device"]))  # under torchrun: join the process group; cuda:LOCAL_RANK
    dtype = next(vae.parameters()).dtype
    source = batch_source(
        train_x, device=dev, dtype=dtype, event_shape=vae.x_shape, likelihood=vae.likelihood, stream=o["stream"]
    )
    rank, world_size = rank_and_world_size()
    if batch_size % world_size:
        raise ValueError(f"batch_size: the global batch of {batch_size} rows does not split among {world_size} ranks")
    vae.to(dev)
    opt = make_optimizer(vae, lr, o["optimizer"], dev)
    extra = {
        "optimizer": qualified_name(o["optimizer"]) if o["optimizer"] is not None else None,
        "scheduler": qualified_name(o["scheduler"]) if o["scheduler"] is not None else None,
        "grad_clip": grad_clip,
        "binarize": binarize if binarize != bernoulli else None,
    }
    default_lr = DEFAULT_LR if o["optimizer"] is None and lr is None else lr
    return Run(
        vae=vae,
        batches=source,
        valid=None if valid_x is None else prepare_valid(vae, valid_x, dev, dtype, binarize, seed),
        objective=objective,
        base_objective=objective,
        valid_objective=valid_objective,
        opt=opt,
        scheduler=make_scheduler(opt, o["scheduler"]),
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


@with_directions
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
        What to maximize: :class:`~vaelib.objectives.ELBO`, :class:`~vaelib.objectives.IWAE`,
        :class:`~vaelib.objectives.BetaELBO`, :class:`~vaelib.objectives.Renyi` (see
        :mod:`vaelib.objectives`), or a function ``(vae, x) -> (batch,)``.
        ``"elbo"`` is ``vaelib.ELBO()`` and ``"iwae"`` is ``vaelib.IWAE()`` (k = 5).
    epochs : int
        Total number of passes over the data (a resumed run counts those done).
    batch_size : int
        Rows per step, all processes together: under ``torchrun`` each of :math:`R` ranks
        takes ``batch_size / R`` rows of every batch (a multiple of :math:`R` is required),
        and the step follows the mean over the whole batch (see :mod:`vaelib.training.distributed`).
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
        :class:`~vaelib.training.callbacks.Callback` objects or plain functions ``f(history)``;
        any of them returning ``True`` after an epoch stops training cleanly. Early
        stopping and keeping the best weights: ``vaelib.EarlyStopping(patience=3,
        restore_best_weights=True)``.
    seed : int
        Seeds every random choice (an integer in [0, 2**64 - 1]); a CPU run repeats exactly.
    checkpoint : path-like, optional
        File written atomically after every epoch (see :func:`vaelib.training.model_file.atomic_save`),
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
        Without a bar each epoch is logged in one line to the ``vaelib.training``
        logger at level INFO.
    stream : bool, optional
        Stream batches from the host (``True``) or hold the data on the device (``False``);
        by default resident when the data fit half of the device's free memory
        (:mod:`vaelib.training.batches`). Both read the same batches: a CPU run ends with the same weights.

    Returns
    -------
    vaelib.training.history.History
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
    vaelib.training.model_file.CheckpointError
        With ``if_exists="resume"``, if the checkpoint is unreadable, was written with
        another objective or other settings (both are named) or for another architecture,
        or holds NaN or infinite weights; nothing is changed.
    vaelib._io.atomic.WriteError
        If a checkpoint cannot be written (a full disk); the previous one is intact.
    vaelib._io.lock.RunLocked
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
    :func:`vaelib.training_precision <vaelib._runtime.devices.training_precision>` (``"medium"`` unless set).

    References
    ----------
    Kingma and Ba (2015), "Adam"; Kingma and Welling (2013), algorithm 1.
    """
    options = dict(locals())
    run = _prepare(vae, train_x, options)
    cbs = checked_callbacks(callbacks, run.valid is not None)
    k = samples_per_point(run.base_objective)
    history, lock = open_checkpoint(run, History(objective=run.label, k=k), if_exists)
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
                    if run_epoch(run, history, epoch, callback_list, bar):
                        history.stopped = callback_list.stopped_by
                        break
                except KeyboardInterrupt:
                    interrupted(run, history, epoch)
                    return history
    finally:
        if bar is not None:
            bar.close()
        callback_list.on_train_end({"epoch": len(history)})
        vae.eval()
        lock.close()
        run.batches.close()
    return history
