"""Where and at what precision vaelib computes: the device, and float32 matrix products.

:func:`resolve_device` turns ``"auto"`` into the fastest device present
(:func:`default_device`: CUDA, then Apple's MPS, then the CPU) and refuses a
device this machine does not have, naming it. :func:`float32_matmul_precision`
lets a block multiply float32 matrices on tensor cores (TF32) or bfloat16
units, and restores the caller's setting afterwards. :func:`training_precision`
sets the precision that :func:`~vaelib.training.fit.fit` trains at, for the calls inside
its block (``"medium"`` elsewhere).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

import torch

from vaelib._checks import MATMUL_PRECISIONS, check_choice

__all__ = [
    "MatmulPrecision",
    "default_device",
    "fit_precision",
    "float32_matmul_precision",
    "resolve_device",
    "training_precision",
]

MatmulPrecision = Literal["highest", "high", "medium"]


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


@contextlib.contextmanager
def float32_matmul_precision(precision: MatmulPrecision | str) -> Iterator[None]:
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


_TRAINING_PRECISION: ContextVar[MatmulPrecision] = ContextVar("vaelib_training_precision", default="medium")


@contextlib.contextmanager
def training_precision(precision: MatmulPrecision | str) -> Iterator[None]:
    """Train at ``precision`` in every :func:`~vaelib.training.fit.fit` called inside the block.

    ``fit`` multiplies float32 matrices in its training steps at ``"medium"`` (TF32 on a
    GPU, bfloat16 products on a CPU that has them; see :func:`float32_matmul_precision`);
    ``with vaelib.training_precision("highest"): fit(...)`` trains in float32 throughout.
    The validation bound and everything outside ``fit`` keep the caller's setting.
    """
    check_choice(precision, "precision", MATMUL_PRECISIONS)
    token = _TRAINING_PRECISION.set(precision)  # type: ignore[arg-type]
    try:
        yield
    finally:
        _TRAINING_PRECISION.reset(token)


def fit_precision() -> MatmulPrecision:
    """The precision :func:`~vaelib.training.fit.fit` trains at: :func:`training_precision`'s, else ``"medium"``."""
    return _TRAINING_PRECISION.get()
