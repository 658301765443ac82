"""The inference gaps of a VAE trained on MNIST (Cremer, Li and Duvenaud 2018), a GPU job.

Chapter 11 splits the gap :math:`\\log p_\\theta(x) - \\mathcal{L}(q_\\phi)` of a
VAE trained on the 8x8 digits into an approximation gap (the best member of
the encoder's family, fitted to each image) and an amortization gap (the
encoder against that best member). This benchmark takes the same measurement
on MNIST, with the same calls:

1. a Gaussian-encoder VAE, ``VAE.mlp(784, 50, hidden=(200, 200))``, and a
   flow-encoder one, ``FlowVAE.mlp`` with the same networks and
   ``--transforms`` spline layers, each trained with :func:`vaelib.fit` on
   dynamically binarized training images for ``--epochs`` epochs;
2. :func:`vaelib.gaps.inference_gaps` on the first ``--n`` binarized test
   images (the Gaussian family for the Gaussian encoder, the flow family for
   the flow encoder), in chunks of ``--chunk`` images so that the ``k``
   importance samples of a chunk fit in memory.

The record holds each model's table (means and standard errors in nats) and
the seconds of training and of the split. (The two parts add up to the gap by
construction; chapter 11 checks each term by a route of its own.) Without ``--data-dir`` it runs on
the embedded digits (a check of the command, not a figure).

Usage::

    python -m benchmarks.inference_gaps --data-dir DIR                      # MNIST (GPU)
    python -m benchmarks.inference_gaps --epochs 2 --n 20 --k 100 --steps 20  # the digits, seconds on a CPU
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import vaelib
from benchmarks import _record
from vaelib._runtime.devices import resolve_device
from vaelib.flows import FlowVAE
from vaelib.gaps import InferenceGaps, inference_gaps

Z_DIM = 50
HIDDEN = (200, 200)


def split(model: Any, x: torch.Tensor, family: str, args: argparse.Namespace) -> InferenceGaps:
    """:func:`~vaelib.gaps.inference_gaps` over ``x`` in chunks of ``args.chunk`` rows, joined."""
    parts = []
    for i, chunk in enumerate(torch.split(x, args.chunk)):  # (chunk, 784) each
        parts.append(
            inference_gaps(
                model,
                chunk,
                family=family,  # type: ignore[arg-type]
                k=args.k,
                k_elbo=args.k_elbo,
                steps=args.steps,
                seed=args.seed + 10 * i,
            )
        )
    joined = {
        name: torch.cat([getattr(p, name).double().cpu() for p in parts])  # (n,)
        for name in ("log_px", "elbo_amortized", "elbo_optimized")
    }
    return InferenceGaps(**joined, family=family)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train both models, split their gaps on the test images, and return the figures."""
    device = resolve_device(args.device)
    if args.data_dir is not None:
        data, (train_x, test_x) = "mnist", vaelib.data.load_mnist(args.data_dir)
    else:
        data, (train_x, test_x) = "digits", vaelib.data.load_digits()
    if args.train_size is not None:
        train_x = train_x[: args.train_size]
    if not 1 <= args.n <= test_x.shape[0]:
        raise ValueError(f"--n: expected 1 to {test_x.shape[0]} test images, got {args.n}")
    x = vaelib.data.binarize(test_x[: args.n], generator=torch.Generator().manual_seed(args.seed)).to(device)
    x_dim = train_x.shape[1]
    models = {}
    figures: dict[str, Any] = {"data": data, "train_images": train_x.shape[0], "test_images": args.n}
    for name, family in (("gaussian", "gaussian"), ("flow", "flow")):
        torch.manual_seed(args.seed)
        if name == "gaussian":
            model: vaelib.VAE = vaelib.VAE.mlp(x_dim, Z_DIM, hidden=HIDDEN)
        else:
            model = FlowVAE.mlp(x_dim, Z_DIM, hidden=HIDDEN, transforms=args.transforms)
        start = time.perf_counter()
        vaelib.fit(model, train_x, epochs=args.epochs, batch_size=100, binarize=True, device=device, seed=args.seed)
        train_seconds = time.perf_counter() - start
        model.eval()
        gaps, split_seconds = _record.timed(lambda m=model, f=family: split(m, x, f, args), device)
        models[name] = gaps
        table = {key: {"mean": round(m, 4), "se": round(s, 4)} for key, (m, s) in gaps.table().items()}
        figures[name] = {
            "model": f"{type(model).__name__}.mlp({x_dim}, {Z_DIM}, hidden={HIDDEN})"
            + (f", transforms={args.transforms}" if name == "flow" else ""),
            "family": family,
            "table": table,
            "train_seconds": round(train_seconds, 2),
            "split_seconds": round(split_seconds, 2),
        }
        print(
            f"{name:8s} encoder: gap {table['inference gap']['mean']:.3f} nats = approximation "
            f"{table['approximation gap']['mean']:.3f} + amortization {table['amortization gap']['mean']:.3f}"
            f"; train {train_seconds:.0f} s, split {split_seconds:.0f} s",
            flush=True,
        )
    figures["settings"] = {
        "epochs": args.epochs,
        "k": args.k,
        "k_elbo": args.k_elbo,
        "steps": args.steps,
        "chunk": args.chunk,
        "seed": args.seed,
    }
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder of the MNIST IDX files (default: the embedded digits)")
    parser.add_argument("--train-size", type=int, help="use only the first N training images")
    parser.add_argument("--epochs", type=int, default=50, help="training epochs of each model (default 50)")
    parser.add_argument("--transforms", type=int, default=2, help="spline layers of the flow encoder (default 2)")
    parser.add_argument("--n", type=int, default=1000, help="test images to split (default 1000)")
    parser.add_argument("--k", type=int, default=5000, help="importance samples for log p(x) (default 5000)")
    parser.add_argument("--k-elbo", type=int, default=1000, help="samples per ELBO estimate (default 1000)")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of each per-image fit (default 300)")
    parser.add_argument("--chunk", type=int, default=100, help="test images split at once (default 100)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for the record (default benchmarks/results)")
    args = parser.parse_args(argv)
    for name in ("epochs", "n", "k", "k_elbo", "steps", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer")
    device = resolve_device(args.device)
    figures = run(args)
    record, path = _record.write("inference_gaps", figures, device, out=args.out)
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
