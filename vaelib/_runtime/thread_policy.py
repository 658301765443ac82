"""The CPU thread policy's inputs: torch's default count, the caller's choice, the size of the work.

What :mod:`vaelib._runtime.threads` decides from: whether vaelib may change
torch's thread count at all (another device, ``VAELIB_CPU_THREADS=torch``, or
the caller fixed the count), which counts are worth timing for a piece of work,
and :func:`cpu_threads` for one-off work that cannot be timed step by step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "POLICY_VARIABLE",
    "SMALL_WORK",
    "THREAD_VARIABLES",
    "caller_chose_threads",
    "cpu_threads",
    "machine_busy",
    "matmul_work",
    "policy_enabled",
    "thread_options",
    "torch_default_threads",
]

# torch runs an element-wise kernel on one thread below 32,768 elements
# (at::internal::GRAIN_SIZE); below this many multiply-adds per matrix
# product there is nothing for a second thread to gain.
SMALL_WORK = 2**16

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
POLICY_VARIABLE = "VAELIB_CPU_THREADS"

# The count torch chose when vaelib was imported (its default unless the
# caller set one before that).
_TORCH_DEFAULT = torch.get_num_threads()


def torch_default_threads() -> int:
    """The number of threads torch had when vaelib was imported (its default)."""
    return _TORCH_DEFAULT


def policy_enabled() -> bool:
    """False when ``VAELIB_CPU_THREADS=torch`` asks vaelib to leave torch's thread count alone."""
    return os.environ.get(POLICY_VARIABLE, "auto").strip().lower() != "torch"


def caller_chose_threads() -> bool:
    """Whether the caller fixed the thread count (``torch.set_num_threads`` or an environment variable)."""
    if any(os.environ.get(name, "").strip() for name in THREAD_VARIABLES):
        return True
    return torch.get_num_threads() != torch_default_threads()


def machine_busy() -> bool:
    """Whether the 1-minute load average already fills the CPUs this process may use."""
    try:
        load = os.getloadavg()[0]
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return False
    return load >= cpus


def matmul_work(model: object, rows: int) -> int:
    """Multiply-adds of the largest matrix product in a pass of ``rows`` rows through ``model``.

    .. math::

        W = \\text{rows} \\times \\max_{\\text{layers}} d_\\text{in} \\, d_\\text{out}

    For a model without linear layers (the linear-Gaussian model) the
    product is its ``x_dim`` by ``z_dim`` matrix.
    """
    sizes = []
    if isinstance(model, nn.Module):
        sizes = [m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    if not sizes:
        sizes = [int(getattr(model, "x_dim", 1)) * int(getattr(model, "z_dim", 1))]
    return int(rows) * max(sizes)


def thread_options(device: torch.device | str, work: int) -> tuple[int, ...]:
    """The thread counts worth timing for ``work`` multiply-adds per product on ``device``.

    Returns
    -------
    tuple of int
        ``()`` when vaelib must leave the count alone (another device, the
        caller fixed it, or the policy is off); ``(1,)`` for small work;
        otherwise ``(1, n)`` with ``n`` torch's default count (``(1,)`` on a
        one-core machine).
    """
    if torch.device(device).type != "cpu" or not policy_enabled() or caller_chose_threads():
        return ()
    default = torch_default_threads()
    if work < SMALL_WORK or default <= 1:
        return (1,)
    return (1, default)


@contextlib.contextmanager
def cpu_threads(device: torch.device | str, work: int) -> Iterator[int]:
    """Run the block on one thread if ``work`` is small, else on torch's count; then restore it.

    For one-off work that cannot be timed step by step. Yields the count used.
    """
    options = thread_options(device, work)
    before = torch.get_num_threads()
    n = options[0] if len(options) == 1 else before
    try:
        if n != before:
            torch.set_num_threads(n)
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
