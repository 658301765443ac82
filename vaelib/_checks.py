"""Argument checks shared by the public functions.

Each check raises before any work is done, with a message that names the
argument, what was expected and what was received.
"""

from __future__ import annotations

import itertools
import numbers

import numpy as np
import torch
from torch import Tensor

LIKELIHOODS = ("bernoulli", "gaussian")
OBJECTIVES = ("elbo", "iwae")
# torch.set_float32_matmul_precision settings, finest first.
MATMUL_PRECISIONS = ("highest", "high", "medium")
# Seeds are what torch.manual_seed takes: integers that fit in 64 bits.
MAX_SEED = 2**64 - 1
# The largest fully connected VAE vaelib builds or loads: 2**28 parameters are 1 GiB
# of float32 weights (3 GiB with Adam's state), far beyond any model of the book.
MAX_PARAMETERS = 2**28


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is an integer >= 1, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value}")
    return int(value)


def check_nonnegative_int(value: object, name: str) -> int:
    """Return ``value`` if it is an integer >= 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {value}")
    return int(value)


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not merely truthy), else raise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def check_seed(value: object, name: str = "seed") -> int:
    """Return ``value`` if it is an integer in [0, 2**64 - 1], else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer in [0, 2**64 - 1], got {value!r}")
    if not 0 <= int(value) <= MAX_SEED:
        raise ValueError(f"{name}: expected an integer in [0, 2**64 - 1] (64 bits), got {value}")
    return int(value)


def mlp_parameter_count(x_dim: int, z_dim: int, hidden: tuple[int, ...], likelihood: str) -> int:
    """Number of parameters of ``VAE.mlp(x_dim, z_dim, hidden, likelihood=likelihood)`` (exact integers)."""
    out = x_dim if likelihood == "bernoulli" else 2 * x_dim
    encoder = [x_dim, *hidden, 2 * z_dim]
    decoder = [z_dim, *reversed(hidden), out]
    return sum(n_in * n_out + n_out for sizes in (encoder, decoder) for n_in, n_out in itertools.pairwise(sizes))


def check_architecture(x_dim: int, z_dim: int, hidden: tuple[int, ...], likelihood: str) -> int:
    """Return the parameter count of an MLP VAE if it is at most :data:`MAX_PARAMETERS`, else raise."""
    n = mlp_parameter_count(x_dim, z_dim, hidden, likelihood)
    if n > MAX_PARAMETERS:
        raise ValueError(
            f"hidden, z_dim: x_dim={x_dim}, z_dim={z_dim}, hidden={list(hidden)} make {n:,} parameters, "
            f"more than the {MAX_PARAMETERS:,} allowed"
        )
    return n


def check_positive_float(value: object, name: str) -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number > 0, got {value!r}")
    if not np.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return float(value)


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise."""
    if value not in choices:
        expected = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}: expected one of {expected}, got {value!r}")
    return str(value)


def as_tensor(x: object, name: str) -> Tensor:
    """Turn array-like data into a floating-point tensor (no copy for tensors)."""
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(x)
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if not t.is_floating_point():
        t = t.float()
    return t


def check_data(
    x: object,
    name: str,
    *,
    x_dim: int | None = None,
    likelihood: str,
    event_shape: tuple[int, ...] | None = None,
) -> Tensor:
    """Validate data for a model whose data points have shape ``event_shape`` (or ``(x_dim,)``).

    Raises
    ------
    TypeError
        If ``x`` is not a tensor or array.
    ValueError
        If ``x`` is empty, not of shape ``(n, *event_shape)``, holds NaN or
        infinite values, or lies outside [0, 1] while the likelihood is Bernoulli.
    """
    if event_shape is None:
        if x_dim is None:
            raise TypeError("check_data: give x_dim or event_shape")
        event_shape = (x_dim,)
    event_shape = tuple(event_shape)
    t = as_tensor(x, name)
    expected = f"(n, {', '.join(str(d) for d in event_shape)})"
    if t.dim() != 1 + len(event_shape):
        raise ValueError(
            f"{name}: expected a {1 + len(event_shape)}-d array of shape {expected}, got shape {tuple(t.shape)}"
        )
    if t.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one row, got an empty array of shape {tuple(t.shape)}")
    if len(event_shape) == 1 and t.shape[1] != event_shape[0]:
        raise ValueError(f"{name}: expected {event_shape[0]} features per row (the model's x_dim), got {t.shape[1]}")
    if tuple(t.shape[1:]) != event_shape:
        raise ValueError(f"{name}: expected shape {expected} (the model's x_shape), got {tuple(t.shape)}")
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN or infinite entries")
    if likelihood == "bernoulli":
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name}: a Bernoulli likelihood needs values in [0, 1], got values in [{lo:g}, {hi:g}]")
    return t


def check_log_weights(log_w: Tensor) -> None:
    """Refuse log importance weights that are not a tensor of shape ``(k, ...)`` with ``k >= 1``."""
    if not isinstance(log_w, Tensor):
        raise TypeError(f"log_w: expected a torch.Tensor, got {type(log_w).__name__}")
    if log_w.dim() < 1 or log_w.shape[0] < 1:
        raise ValueError(f"log_w: expected shape (k, batch) with k >= 1, got {tuple(log_w.shape)}")
