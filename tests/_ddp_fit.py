"""A training run for tests/test_distributed.py, started by ``torchrun`` (or in-process, as one rank).

``python -m torch.distributed.run --nproc-per-node 2 tests/_ddp_fit.py OUT EPOCHS [--resume] [--kill-after E]``
``[--stream]``
trains a float64 VAE on 201 digits with a bound that draws no random numbers, so that two ranks and one
process take the same steps up to rounding, and writes ``OUT/rank<r>.pt``: the weights, the history and
the number of rows this rank trained on. With ``--stream`` the rows come from a map-style data set of
(image, label) pairs, streamed by a DataLoader with one worker process.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

import vaelib

ROWS, BATCH = 201, 50  # the last batch of 1 row: rank 1 has no share of it


def mean_code_bound(vae: vaelib.VAE, x: Tensor) -> Tensor:
    """The ELBO with z at the encoder's mean: log p(x | mu(x)) - KL(q(z | x) || p(z)); no sampling."""
    q = vae.encode(x)
    if torch.is_grad_enabled():
        # rows of data: a rank with no share of a batch steps on a stand-in row of zeros
        mean_code_bound.rows += int((x.abs().sum(-1) > 0).sum())  # type: ignore[attr-defined]
    return vae.decode(q.mean).log_prob(x) - torch.distributions.kl_divergence(q, vae.prior)


mean_code_bound.rows = 0  # type: ignore[attr-defined]


class Pairs(Dataset):
    """(image, label) pairs, read one at a time."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.x[i], i % 10


def train(
    epochs: int,
    checkpoint: Path | None = None,
    resume: bool = False,
    kill_after: int | None = None,
    stream: bool = False,
):
    torch.manual_seed(0)
    vae = vaelib.VAE.mlp(x_dim=64, z_dim=3, hidden=(16,)).double()
    x = vaelib.data.load_digits()[0][:ROWS].double()

    def kill(history: vaelib.training.history.History) -> None:
        if history.epoch[-1] == kill_after:
            dist.barrier()  # rank 0 has written this epoch's checkpoint
            if dist.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    data = torch.utils.data.DataLoader(Pairs(x), num_workers=1) if stream else x
    with vaelib.training_precision("highest"):
        history = vaelib.fit(
            vae,
            data,
            objective=mean_code_bound,
            binarize=False,
            epochs=epochs,
            batch_size=BATCH,
            lr=1e-2,
            seed=3,
            device="cpu",
            checkpoint=checkpoint,
            if_exists="resume" if resume else "error",
            progress=False,
            callbacks=[kill] if kill_after is not None else None,
            stream=stream,
        )
    return vae, history


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("epochs", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    vae, history = train(args.epochs, args.out / "checkpoint.pt", args.resume, args.kill_after, args.stream)
    rank, world_size = vaelib.training.distributed.rank_and_world_size()
    record = {
        "state": vae.state_dict(),
        "epochs": history.epoch,
        "train_bound": history.train_bound,
        "rows": mean_code_bound.rows,  # type: ignore[attr-defined]
        "world_size": world_size,
    }
    torch.save(record, args.out / f"rank{rank}.pt")
    vaelib.training.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
