"""Training one model on several processes with ``torch.distributed`` (data parallelism).

Start a script that calls :func:`vaelib.training.fit.fit` with ``torchrun``, or the
command line itself::

    torchrun --nproc-per-node 4 -m vaelib train --data mnist --root data/mnist --out runs/x

and ``fit`` finds the process group from ``torchrun``'s environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``), joins it (NCCL
on CUDA, gloo on the CPU) and trains with
:class:`~torch.nn.parallel.DistributedDataParallel`. ``batch_size`` is the
global batch: every epoch all ranks share one permutation of the rows (rank
0's, broadcast), each rank takes its ``batch_size / world_size`` rows of every
batch, and the gradient that each rank applies is the mean over the whole
batch,

.. math::

    g = \\frac{1}{B} \\sum_{r=1}^{R} \\sum_{b \\in \\mathcal{B}_r} \\nabla \\mathcal{L}(x_b),

so :math:`R` processes take the steps that one process takes with the same
``batch_size``, up to rounding and the Monte Carlo noise (each rank draws
its own, from ``(seed, epoch, rank)``). Only rank 0 writes checkpoints and
shows progress.

References
----------
Li et al. (2020), "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training", VLDB.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "all_sum",
    "broadcast",
    "init_from_env",
    "is_main",
    "rank_and_world_size",
    "rank_seed",
    "shutdown",
    "wrap",
]

TIMEOUT = datetime.timedelta(minutes=30)  # a rank that waits this long for the others fails


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or a launcher that sets the same variables) with peers."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process is rank 0 (or the only one): the one that writes files and shows progress."""
    return rank_and_world_size()[0] == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group that ``torchrun`` describes, once; return the device this rank trains on.

    Outside ``torchrun`` nothing happens and ``device`` is returned. On CUDA the
    backend is NCCL and the rank trains on ``cuda:LOCAL_RANK``; elsewhere gloo.
    A group the caller initialized already is used as it is.
    """
    if not (dist.is_available() and (dist.is_initialized() or launched())):
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def shutdown() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _Objective(nn.Module):
    """The model and its objective as one module whose forward is the bound per row, for DDP to wrap."""

    def __init__(self, vae: nn.Module, objective: Callable[[Any, Tensor], Tensor]) -> None:
        super().__init__()
        self.vae = vae
        self.objective = objective

    def forward(self, x: Tensor) -> Tensor:
        return self.objective(self.vae, x)  # (rows,)


def wrap(vae: nn.Module, objective: Callable[[Any, Tensor], Tensor], device: torch.device) -> nn.Module:
    """``objective(vae, x)`` as a DistributedDataParallel module: its backward all-reduces the gradients.

    Rank 0's weights are broadcast to the other ranks here. The objective must use
    every parameter of the model in each step (the built-in ones do).
    """
    return DistributedDataParallel(
        _Objective(vae, objective),
        device_ids=[device.index] if device.type == "cuda" else None,
    )


def broadcast(t: Tensor) -> Tensor:
    """Rank 0's ``t`` on every rank (in place)."""
    dist.broadcast(t, src=0)
    return t


def all_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over the ranks, on every rank (in place)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for each rank, from a shared one."""
    return (seed * 1_000_003 + 7_919 * (rank + 1)) % (2**63)
