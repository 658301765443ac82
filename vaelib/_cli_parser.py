"""The argument parser of the command line (:mod:`vaelib.cli`): its options, their checks and its help."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn

from vaelib._checks import LIKELIHOODS, MATMUL_PRECISIONS, MAX_SEED
from vaelib.iwae_gradients import IWAE_ESTIMATORS
from vaelib.networks import ACTIVATIONS
from vaelib.objectives import ELBO, IWAE, BetaELBO, Objective, Renyi

__all__ = ["CLI_OBJECTIVES", "EPILOG", "EXIT_ERROR", "Command", "make_parser", "objective_from_args"]

# The bounds --objective names (vaelib.cli builds the objective value of each).
CLI_OBJECTIVES = ("elbo", "iwae", "beta-elbo", "renyi")

EXIT_ERROR = 2
Command = Callable[[argparse.Namespace], int]

EPILOG = """examples:
  vaelib train --data digits --objective iwae --k 5 --epochs 50 --out runs/iwae5
  vaelib train --data digits --objective iwae --k 5 --epochs 50 --out runs/iwae5 --resume
  vaelib train --data mnist --root data/mnist --download --z-dim 50 --out runs/mnist
  vaelib evaluate runs/iwae5 --k 5000
  torchrun --nproc-per-node 4 -m vaelib train --data mnist --root data/mnist --out runs/mnist

errors print one line and exit with status 2; an interrupted run exits with 130
(143 for SIGTERM, 129 for SIGHUP) and continues with --resume."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:  # required options, flags
            return action.help or ""
        return super()._get_help_string(action) or ""


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


def _float_above(low: float, *, strict: bool) -> Callable[[str], float]:
    """An argparse type: a finite number > ``low`` (``strict``) or >= ``low``."""
    expected = f"a finite number {'>' if strict else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_float = _float_above(0.0, strict=True)
_nonnegative_float = _float_above(0.0, strict=False)


# --objective NAME: the objective value it builds, and the flags that set its fields.
_BUILDS: dict[str, tuple[Callable[..., Objective], tuple[str, ...]]] = {
    "elbo": (ELBO, ("k", "analytic_kl")),
    "iwae": (IWAE, ("k", "estimator")),
    "beta-elbo": (BetaELBO, ("k", "beta", "warmup_epochs", "free_bits")),
    "renyi": (Renyi, ("k", "alpha")),
}
_OBJECTIVE_FLAGS = ("k", "analytic_kl", "estimator", "beta", "warmup_epochs", "free_bits", "alpha")


def objective_from_args(args: argparse.Namespace) -> Objective:
    """The objective value that ``--objective`` and its flags describe (the same classes as ``fit`` takes)."""
    make, fields = _BUILDS[args.objective]
    given = {flag: getattr(args, flag) for flag in _OBJECTIVE_FLAGS if getattr(args, flag) not in (None, False)}
    stray = [flag for flag in given if flag not in fields]
    if stray:
        flag = stray[0].replace("_", "-")
        users = [name for name, (_, f) in _BUILDS.items() if stray[0] in f]
        raise ValueError(f"--{flag}: applies to --objective {' or '.join(users)} only, not {args.objective}")
    if args.objective == "renyi" and "alpha" not in given:
        raise ValueError("--alpha: --objective renyi needs its alpha, a number in [0, 1)")
    try:
        return make(**given)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--{str(err).split(':', 1)[0].replace('_', '-')}: {str(err).split(': ', 1)[-1]}") from None


def make_parser(description: str, *, train: Command, evaluate: Command) -> argparse.ArgumentParser:
    """The ``vaelib`` argument parser; ``train`` and ``evaluate`` run its two commands (``args.func``)."""
    parser = _Parser(prog="vaelib", description=description, epilog=EPILOG, formatter_class=_Formatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate}")
    t = commands.add_parser(
        "train",
        help="train a VAE, checkpointing every epoch",
        description="Train a fully connected VAE (VAE.mlp) with Adam on a bound. Writes into --out:\n"
        "run.json (the options), checkpoint.pt (after every epoch), then metrics.json and samples.png.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    t.add_argument("--out", required=True, metavar="DIR", help="folder for the run's files (created if needed)")
    t.add_argument(
        "--data", choices=("digits", "mnist"), default="digits", help="data set: the embedded 8x8 digits or MNIST"
    )
    t.add_argument("--root", metavar="DIR", help="folder of the four MNIST IDX files (needed with --data mnist)")
    t.add_argument("--download", action="store_true", help="fetch missing MNIST files (each checked by SHA-256)")
    t.add_argument("--objective", choices=CLI_OBJECTIVES, default="elbo", help="bound to maximize")
    t.add_argument(
        "--k",
        type=_int_at_least(1),
        help="importance samples per data point in training (default: 1 for elbo and beta-elbo, 5 for iwae and renyi)",
    )
    t.add_argument("--analytic-kl", action="store_true", help="closed-form KL term (with --objective elbo only)")
    t.add_argument("--estimator", choices=IWAE_ESTIMATORS, help="gradient estimator (with --objective iwae only)")
    t.add_argument("--beta", type=_nonnegative_float, help="KL weight (with --objective beta-elbo only; default 1)")
    t.add_argument(
        "--warmup-epochs", type=_int_at_least(0), help="epochs of linear KL warm-up (with --objective beta-elbo only)"
    )
    t.add_argument(
        "--free-bits", type=_nonnegative_float, help="free bits per latent dimension (with --objective beta-elbo only)"
    )
    t.add_argument("--alpha", type=_nonnegative_float, help="Renyi alpha in [0, 1) (with --objective renyi; needed)")
    t.add_argument("--epochs", type=_int_at_least(0), default=50, help="total passes over the training data")
    t.add_argument("--batch-size", type=_int_at_least(1), default=100, help="data points per gradient step")
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam's learning rate")
    t.add_argument(
        "--seed", type=_int_at_least(0, MAX_SEED), default=0, help="seeds the initial weights and every epoch (64 bits)"
    )
    t.add_argument("--z-dim", type=_int_at_least(1), default=10, help="latent dimension")
    t.add_argument("--hidden", type=_int_at_least(1), nargs="+", default=[200, 200], help="hidden layer sizes")
    t.add_argument("--activation", choices=tuple(ACTIVATIONS), default="tanh", help="hidden-layer nonlinearity")
    t.add_argument("--likelihood", choices=LIKELIHOODS, default="bernoulli", help="family of p(x | z)")
    t.add_argument("--device", default="auto", help="'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda' or 'mps'")
    t.add_argument(
        "--matmul-precision",
        choices=MATMUL_PRECISIONS,
        default="medium",
        help="float32 matrix products in training: 'medium' allows TF32 (GPU) or bfloat16 (CPU with AMX)",
    )
    t.add_argument("--test-k", type=_int_at_least(1), default=100, help="importance samples for the test log p(x)")
    t.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt after an interruption")
    t.set_defaults(func=train)
    e = commands.add_parser(
        "evaluate",
        help="importance-sampled test log-likelihood of a trained run",
        description="Load RUN/checkpoint.pt and print the importance-sampled log p(x) (Burda et al. 2015,\n"
        "section 5.1), averaged over the test set of the data the run was trained on.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    e.add_argument("run", metavar="RUN", help="a folder written by 'vaelib train'")
    e.add_argument("--k", type=_int_at_least(1), default=5000, help="importance samples per test image")
    e.add_argument("--batch-size", type=_int_at_least(1), help="test images per pass (default: chosen from the device)")
    e.add_argument("--root", metavar="DIR", help="folder of the MNIST files, if not where the run found them")
    e.add_argument("--device", default="auto", help="'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda' or 'mps'")
    e.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0, help="seeds the importance samples")
    e.set_defaults(func=evaluate)
    return parser
