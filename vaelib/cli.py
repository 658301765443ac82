"""The command line: train a VAE into a folder, resume it, evaluate it.

::

    vaelib train --data digits --objective iwae --k 5 --epochs 50 --out runs/x
    vaelib train --data digits --objective iwae --k 5 --epochs 50 --out runs/x --resume
    vaelib evaluate runs/x --k 5000

``python -m vaelib`` is the same program. ``train`` writes into ``--out``:
``run.json`` (the options, first), ``checkpoint.pt`` after every epoch (atomically,
see :func:`vaelib.training.model_file.atomic_save`), then ``metrics.json`` (history,
options, test bound, test log-likelihood) and ``samples.png``. Errors print one
line to standard error and exit with status 2; an interrupted run exits with
status 130 (Ctrl-C), 143 (SIGTERM, as cluster schedulers send before killing a
job) or 129 (SIGHUP), keeps the last completed epoch and continues with
``--resume``. A run holds a lock on its folder: a second ``train`` into the
same ``--out`` is refused with the first one's pid.

Started by ``torchrun`` (``torchrun --nproc-per-node 4 -m vaelib train ...``),
every process trains one share of each batch of ``--batch-size`` rows (the
global batch, see :mod:`vaelib.training.distributed`); rank 0 alone checks ``--out``,
fetches the data, writes the files and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vaelib._checks import check_architecture
from vaelib._cli_parser import EXIT_ERROR, make_parser, objective_from_args
from vaelib._io.atomic import atomic_write, remove_stale_temporaries
from vaelib._io.lock import RunLocked, exclusive
from vaelib._runtime.devices import resolve_device, training_precision
from vaelib._runtime.progress import progress_enabled
from vaelib._stats import mean_se
from vaelib.data import binarize, load_digits, load_mnist
from vaelib.evaluate import log_likelihood
from vaelib.models import VAE
from vaelib.objectives import (
    IWAE,
    BetaELBO,
    Objective,
    Renyi,
    describe,
    samples_per_point,
    settings_of,
    upgrade_settings,
    validation_objective,
)
from vaelib.training.checkpoint import verify_training_checkpoint
from vaelib.training.distributed import init_from_env, rank_and_world_size, shutdown
from vaelib.training.fit import fit, run_settings
from vaelib.training.history import History
from vaelib.training.loop import TrainingDiverged
from vaelib.training.model_file import load
from vaelib.training.run_folder import CHECKPOINT, LOCK, METRICS, RUN, SAMPLES, check_out, read_run, write_json

__all__ = ["build_parser", "main"]

EXIT_INTERRUPTED = 130
X_DIM = {"digits": 64, "mnist": 784}
# Options that must be the same when a run is resumed (each set by the flag --KEY-WITH-DASHES);
# the objective, with every field, is compared as its value records it.
_FIXED = "data z_dim hidden activation likelihood objective batch_size lr seed".split()


def _label(objective: Objective) -> str:
    """How the CLI names the bound in its lines: ELBO, IWAE (k=5), beta-ELBO, Renyi (alpha=0.5, k=5)."""
    if isinstance(objective, IWAE):
        return f"IWAE (k={objective.k})"
    if isinstance(objective, Renyi):
        return f"Renyi (alpha={objective.alpha:g}, k={objective.k})"
    return "beta-ELBO" if isinstance(objective, BetaELBO) else "ELBO"


def build_parser() -> argparse.ArgumentParser:
    """The ``vaelib`` argument parser, with its ``train`` and ``evaluate`` commands."""
    return make_parser(__doc__.split("\n")[0], train=train, evaluate=evaluate)


def _load_data(data: str, root: str | None, download: bool) -> tuple[Tensor, Tensor]:
    if data == "digits":
        train, test = load_digits()
        return train, test
    if root is None:
        raise ValueError("--root: --data mnist needs the folder of the MNIST files (add --download to fetch them)")
    train, test = load_mnist(root, download=download)
    return train, test


def _test_set(test_x: Tensor, likelihood: str, seed: int) -> Tensor:
    """Test images as the likelihood scores them: binarized once, from ``seed``, for a Bernoulli decoder."""
    if likelihood != "bernoulli":
        return test_x
    return binarize(test_x, generator=torch.Generator().manual_seed(seed))


def _epoch_line(epochs: int, label: str) -> Callable[[History], None]:
    def report(h: History) -> None:
        print(
            f"epoch {h.epoch[-1]}/{epochs}  train {label} {h.train_bound[-1]:.3f} nats  {h.seconds[-1]:.2f} s",
            flush=True,
        )

    return report


def _draw(vae: VAE, test_x: Tensor, path: Path, seed: int) -> bool:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed; {path.name} is not drawn", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vaelib.book.plot import samples_and_reconstructions

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fig = samples_and_reconstructions(vae, test_x)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


def train(args: argparse.Namespace) -> int:
    """``vaelib train``: see :func:`build_parser` for the options."""
    out = Path(args.out)
    checkpoint = out / CHECKPOINT
    objective = objective_from_args(args)
    try:
        check_architecture(X_DIM[args.data], args.z_dim, tuple(args.hidden), args.likelihood)
    except ValueError as err:
        raise ValueError(f"--hidden, --z-dim: {str(err).split(': ', 1)[1]}") from None
    device = init_from_env(resolve_device(args.device))  # under torchrun: join the group
    rank, world_size = rank_and_world_size()
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size: the global batch of {args.batch_size} does not split among {world_size} ranks")
    if rank != 0:
        return _train_rank(args, objective, checkpoint, device)
    check_out(out, args.out, args.resume)
    train_x, test_x = _load_data(args.data, args.root, args.download)
    if world_size > 1:
        dist.barrier()  # the data are here: the other ranks may read them
    root = str(Path(args.root).resolve()) if args.root else None
    config = {"format": "vaelib-run", "x_dim": train_x.shape[1], "root": root, "epochs": args.epochs}
    config |= {key: getattr(args, key) for key in _FIXED}
    config["objective"] = settings_of(objective)
    config["matmul_precision"] = args.matmul_precision  # may change on --resume
    with exclusive(out / LOCK, f"the run folder {out}"):
        check_out(out, args.out, args.resume)  # again, now that no other run can change it
        return _train_locked(args, objective, out, checkpoint, config, device, train_x, test_x)


def _fit_options(
    args: argparse.Namespace, objective: Objective, checkpoint: Path, device: torch.device
) -> dict[str, Any]:
    """The arguments of ``fit`` that the command's flags give."""
    options: dict[str, Any] = {key: getattr(args, key) for key in ("epochs", "batch_size", "lr", "seed")}
    if_exists = "resume" if args.resume else "error"
    return options | {"objective": objective, "device": device, "checkpoint": checkpoint, "if_exists": if_exists}


def _train_rank(args: argparse.Namespace, objective: Objective, checkpoint: Path, device: torch.device) -> int:
    """A rank other than 0 under torchrun: it trains its share of every batch and writes nothing."""
    dist.barrier()  # rank 0 has checked --out and fetched the data
    train_x, _ = _load_data(args.data, args.root, download=False)
    torch.manual_seed(args.seed)
    vae = VAE.mlp(train_x.shape[1], args.z_dim, tuple(args.hidden), args.activation, args.likelihood)
    options = _fit_options(args, objective, checkpoint, device)
    with warnings.catch_warnings(), training_precision(args.matmul_precision):
        warnings.filterwarnings("ignore", message="fit: interrupted")  # rank 0 says it
        history = fit(vae, train_x, **options, progress=False)
    return _STOP.status() if history.interrupted else 0


def _train_locked(
    args: argparse.Namespace,
    objective: Objective,
    out: Path,
    checkpoint: Path,
    config: dict[str, Any],
    device: torch.device,
    train_x: Tensor,
    test_x: Tensor,
) -> int:
    """The part of ``vaelib train`` that runs while this process holds the folder's lock."""
    if args.resume and (out / RUN).exists():
        saved = upgrade_settings(read_run(out / RUN))  # a run folder of an earlier version names the objective
        saved["objective"] = describe(saved.get("objective"))
        config = config | {"objective": describe(config["objective"])}
        changed = [
            f"--{key.replace('_', '-')} {saved.get(key)} then, {config[key]} now"
            for key in _FIXED
            if saved.get(key) != config[key]
        ]
        if changed:
            raise ValueError(f"--resume: {out} was trained with other options ({'; '.join(changed)})")
    remove_stale_temporaries(out, (CHECKPOINT, RUN, METRICS, SAMPLES))  # left by killed writes
    torch.manual_seed(args.seed)
    vae = VAE.mlp(train_x.shape[1], args.z_dim, tuple(args.hidden), args.activation, args.likelihood)
    if args.resume and checkpoint.exists():  # every check of the resume, before run.json is written
        settings = run_settings(objective, args.batch_size, args.lr, args.seed)
        verify_training_checkpoint(checkpoint, vae, settings, epochs=args.epochs)
    write_json(out / RUN, config | {"objective": settings_of(objective)})
    label = _label(objective)
    show_bar = sys.stdout.isatty() and progress_enabled(None)
    options = _fit_options(args, objective, checkpoint, device) | {"progress": show_bar}
    lines = [] if show_bar else [_epoch_line(args.epochs, label)]
    with warnings.catch_warnings(), training_precision(args.matmul_precision):
        warnings.filterwarnings("ignore", message="fit: interrupted")  # said below, in one line
        history = fit(vae, train_x, **options, callbacks=lines)
    if history.interrupted:
        how = f"stopped by {_STOP.name}" if _STOP.signum else "interrupted"
        print(f"vaelib train: {how} after epoch {len(history)}; add --resume to continue", file=sys.stderr)
        return _STOP.status()
    test = _test_set(test_x, args.likelihood, args.seed).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(args.seed)
        scored = validation_objective(objective)  # the ELBO for beta-elbo
        test_bound = torch.cat([scored(vae, xb) for xb in test.split(1000)])
        ll = log_likelihood(vae, test, k=args.test_k, progress=show_bar).double().cpu()
    metrics: dict[str, Any] = {
        "settings": config,
        "history": history.to_dict(),
        "test_bound": {
            "objective": settings_of(scored),
            "k": samples_per_point(scored),
            "nats": float(test_bound.mean()),
        },
        "test_log_likelihood": {"k": args.test_k, "nats": float(ll.mean()), "standard_error": mean_se(ll)[1]},
        "n_test": test.shape[0],
    }
    write_json(out / METRICS, metrics)
    drawn = _draw(vae, test_x, out / SAMPLES, args.seed)
    print(
        f"test {_label(scored)} {metrics['test_bound']['nats']:.3f} nats; test log p(x) {float(ll.mean()):.3f} nats "
        f"(k={args.test_k}); wrote {out / METRICS}{' and ' + str(out / SAMPLES) if drawn else ''}"
    )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``vaelib evaluate``: print the importance-sampled test log-likelihood of a run."""
    run = Path(args.run)
    checkpoint = run / CHECKPOINT
    if checkpoint.is_dir():
        raise ValueError(f"{checkpoint}: a folder, not a checkpoint file")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no checkpoint; is {run} a folder written by 'vaelib train'?")
    config = read_run(run / RUN)
    device = resolve_device(args.device)
    vae = load(checkpoint, device=device)
    _, test_x = _load_data(config["data"], args.root or config.get("root"), download=False)
    if test_x.shape[1] != vae.x_dim:
        raise ValueError(f"{checkpoint}: a model of {vae.x_dim} pixels, but {config['data']} has {test_x.shape[1]}")
    test = _test_set(test_x, vae.likelihood, int(config.get("seed", 0)))
    show_bar = sys.stdout.isatty() and progress_enabled(None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        ll = log_likelihood(vae, test, k=args.k, batch_size=args.batch_size, progress=show_bar).double().cpu()
    print(
        f"test log-likelihood: {float(ll.mean()):.4f} nats per image "
        f"(k={args.k}, {ll.numel()} test images of {config['data']}, standard error {mean_se(ll)[1]:.4f})"
    )
    return 0


class _Stop:
    """The signal that stopped the command, if one did: SIGTERM and SIGHUP are handled like Ctrl-C."""

    signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "SIGINT"

    def status(self) -> int:
        return 128 + self.signum if self.signum else EXIT_INTERRUPTED

    def handler(self, signum: int, frame: object) -> None:
        self.signum = signum
        raise KeyboardInterrupt  # fit finishes or rolls back to the last completed epoch

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        self.signum = None
        names = ("SIGTERM", "SIGHUP")
        signums = [getattr(signal, n) for n in names if hasattr(signal, n)]
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            signums = []
        previous = {n: signal.signal(n, self.handler) for n in signums}
        try:
            yield
        finally:
            for n, old in previous.items():
                signal.signal(n, old)


_STOP = _Stop()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with _STOP.installed():
            code: int = args.func(args)
            return code
    except KeyboardInterrupt:
        how = f"stopped by {_STOP.name}" if _STOP.signum else "interrupted"
        print(f"vaelib {args.command}: {how}", file=sys.stderr)
        return _STOP.status()
    # CheckpointError and IDXError are ValueErrors; WriteError (a full disk) is an OSError.
    except (ValueError, TypeError, OSError, TrainingDiverged, RunLocked) as err:
        print(f"vaelib {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        shutdown()  # leave the process group that torchrun's environment made this command join, if any
