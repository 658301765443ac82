"""Streamed against resident batches: images per second of :func:`vaelib.fit` both ways on the same data.

Both ways train the same model from the same initial weights with the same
seed, batch size and optimizer; only where the batches come from differs:

* **resident**: ``fit(vae, x, stream=False)``, the data on the device and each
  batch sliced from it (what ``fit`` does by default when the data fit);
* **streamed**: ``fit(vae, DataLoader(data, num_workers=W), stream=True)``, each batch
  gathered on the host by a DataLoader (worker processes, pinned memory on a
  GPU, a non-blocking copy, one batch ahead), as for data that do not fit the
  device. ``data`` is a map-style data set read one image at a time, as a
  reader's own data set would be (``--source items``, the default), or a
  ``TensorDataset``, which ``fit`` gathers with one indexing per batch
  (``--source tensors``). ``--workers 0,1`` times each worker count.

The first epoch of every run is a warm-up and is not timed; the two ways
alternate in order across repeats so a drift in the machine's load does not
favour one. The same seed gives the same batches both ways, so on a CPU the
two trained models must be equal bit for bit; the record says whether they are.
The target on a 2-core CPU is a ratio (streamed / resident) of at least 0.8
for the 784-400-20 MNIST model.

Usage::

    python -m benchmarks.streaming --data-dir DIR            # MNIST, 784-400-20
    python -m benchmarks.streaming                           # the embedded 8x8 digits, 64-400-20
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import vaelib
from benchmarks import _record
from benchmarks.throughput import load_data
from vaelib._runtime.devices import resolve_device
from vaelib.training.batches import default_workers

BATCH_SIZE = 128
LR = 1e-3
Z_DIM = 20
HIDDEN = (400,)
TARGET_CPU = 0.8


class Images(Dataset):
    """A map-style data set of the rows of ``x``, read one image at a time (no batched read)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def train(
    data: Any, x_dim: int, stream: bool, epochs: int, device: torch.device, workers: int
) -> tuple[list[float], dict]:
    """Seconds of each epoch after the first, and the trained weights (on the CPU)."""
    torch.manual_seed(0)
    vae = vaelib.VAE.mlp(x_dim, Z_DIM, hidden=HIDDEN, activation="relu")
    if stream:  # fit takes the worker count of a DataLoader it is given
        data = DataLoader(data, num_workers=workers)
    history = vaelib.fit(
        vae,
        data,
        epochs=epochs,
        batch_size=BATCH_SIZE,
        lr=LR,
        device=device,
        seed=0,
        progress=False,
        stream=stream,
    )
    return history.seconds[1:], {k: v.detach().cpu() for k, v in vae.state_dict().items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="folder of the MNIST IDX files (default: the embedded digits)")
    parser.add_argument("--train-size", type=int, help="use only the first N training images")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run, the first untimed")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way, in rotating order")
    parser.add_argument("--workers", help="comma-separated worker counts (default: fit's own choice)")
    parser.add_argument("--source", choices=("items", "tensors"), default="items", help="the streamed data set")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="folder for the record (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (the first is not timed)")
    device = resolve_device(args.device)
    counts = [int(w) for w in args.workers.split(",")] if args.workers else [default_workers(device)]
    name, train_x, _ = load_data(args.data_dir, args.train_size)
    streamed_data = Images(train_x) if args.source == "items" else TensorDataset(train_x)
    ways = ["resident"] + [f"streamed-{w}" for w in counts]
    load_before = _record.load()
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    weights: dict[str, list[dict]] = {way: [] for way in ways}
    for repeat in range(args.repeats):
        for way in ways[repeat % len(ways) :] + ways[: repeat % len(ways)]:  # each way goes first in turn
            if way == "resident":
                s, w = train(train_x, train_x.shape[1], False, args.epochs, device, 0)
            else:
                workers = int(way.split("-")[1])
                s, w = train(streamed_data, train_x.shape[1], True, args.epochs, device, workers)
            seconds[way] += s
            weights[way].append(w)
    load_after = _record.load()
    n = train_x.shape[0]
    rate = {way: n / statistics.median(s) for way, s in seconds.items()}
    same = all(
        all(torch.equal(a[k], b[k]) for k in a)
        for way in ways[1:]
        for a, b in zip(weights["resident"], weights[way], strict=True)
    )
    first = ways[1]
    figures = {
        "data": name,
        "model": f"VAE.mlp({train_x.shape[1]}, {Z_DIM}, hidden={HIDDEN}, activation='relu', likelihood='bernoulli')",
        "train_images": n,
        "batch_size": BATCH_SIZE,
        "optimizer": f"Adam(lr={LR})",
        "epochs": args.epochs,
        "repeats": args.repeats,
        "source": args.source,
        "streamed_source": {
            "items": "a map-style Dataset read one image at a time, DataLoader over fit's index batches",
            "tensors": "TensorDataset(x): one indexing per batch, DataLoader over fit's index batches",
        }[args.source],
        "workers": counts[0],
        "warmup": "the first epoch of every run is not timed",
        "statistic": "median over the timed epochs of all repeats",
        "resident_images_per_s": round(rate["resident"], 1),
        "streamed_images_per_s": round(rate[first], 1),
        "ratio": round(rate[first] / rate["resident"], 3),
        "by_workers": {
            str(int(way.split("-")[1])): {
                "streamed_images_per_s": round(rate[way], 1),
                "ratio": round(rate[way] / rate["resident"], 3),
                "seconds": [round(x, 4) for x in seconds[way]],
            }
            for way in ways[1:]
        },
        "target_cpu": TARGET_CPU,
        "same_weights": same,
        "same_weights_rule": "every parameter equal bit for bit (expected on a CPU; a GPU may differ in rounding)",
        "resident_seconds": [round(x, 4) for x in seconds["resident"]],
        "load_before": load_before,
        "load_after": load_after,
    }
    record_name = (
        "streaming" + ("-tensors" if args.source == "tensors" else "") + ("" if name == "mnist" else f"-{name}")
    )
    record, path = _record.write("streaming", figures, device, name=record_name, out=args.out)
    rates = ", ".join(f"{w} workers {rate[f'streamed-{w}']:.0f}" for w in counts)
    print(
        f"streaming: resident {rate['resident']:.0f} images/s, streamed ({args.source}) {rates} images/s; "
        f"ratio {figures['ratio']:.2f} with {counts[0]} workers; same weights: {same}; wrote {path}"
    )
    return record


if __name__ == "__main__":
    main()
