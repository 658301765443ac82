"""Importance-sampled log-likelihood: seconds and peak memory of :func:`vaelib.log_likelihood`.

The model is the one-stochastic-layer architecture of Burda et al. (2015),
``VAE.mlp(784, 50, hidden=(200, 200), activation="tanh")``, untrained or
briefly trained (``--train-epochs``); the time of the evaluation does not
depend on the weights. The full job is ``k = 5000`` samples for each of the
10,000 MNIST test images (5 x 10^7 passes through the decoder), a GPU job;
``--n`` takes the first ``n`` test images so a CPU can run a subset, and the
record says which.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on a CPU it is the
process's peak resident set size during the evaluation (``VmHWM`` of
``/proc/self/status`` after resetting it, where Linux allows; otherwise
``ru_maxrss``, the peak of the whole process).

Usage::

    python -m benchmarks.loglik --data-dir DIR                   # 10,000 x 5000 (GPU)
    python -m benchmarks.loglik --data-dir DIR --n 100           # a CPU subset
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

import vaelib
from benchmarks import _record
from vaelib._runtime.devices import resolve_device

Z_DIM = 50
HIDDEN = (200, 200)
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mib(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Peak memory of the code run between :meth:`start` and :meth:`stop`, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.before = 0.0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / 2**20
            self.method = "torch.cuda.max_memory_allocated"
            return
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM, the peak resident set size
            rss = _status_mib("VmRSS")
            if rss is None:
                raise OSError("no VmRSS")
            self.before = rss
            self.method = "peak resident set size (VmHWM, reset before the evaluation)"
        except OSError:
            self.before = _ru_maxrss_mib()
            self.method = "ru_maxrss (peak of the whole process, loading included)"

    def stop(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.method.startswith("peak resident"):
            peak = _status_mib("VmHWM") or _ru_maxrss_mib()
        else:
            peak = _ru_maxrss_mib()
        return {
            "peak_memory_mib": round(peak, 1),
            "memory_before_mib": round(self.before, 1),
            "peak_increase_mib": round(peak - self.before, 1),
            "memory_method": self.method,
        }


def _ru_maxrss_mib() -> float:
    # Linux reports kilobytes, macOS bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def run(
    *,
    data_dir: str | None,
    n: int | None,
    k: int,
    batch_size: int | None,
    train_epochs: int,
    device: str,
    seed: int,
) -> dict[str, Any]:
    """Build (and optionally train) the model, then time one call of ``log_likelihood``."""
    dev = resolve_device(device)
    if data_dir is not None:
        data, (train_x, test_x) = "mnist", vaelib.data.load_mnist(data_dir)
    else:
        data, (train_x, test_x) = "digits", vaelib.data.load_digits()
    available = test_x.shape[0]
    n = available if n is None else n
    if not 1 <= n <= available:
        raise ValueError(f"n: expected 1 to {available} test images, got {n}")
    x = vaelib.data.binarize(test_x[:n], generator=torch.Generator().manual_seed(seed))
    x_dim = x.shape[1]
    torch.manual_seed(seed)
    vae = vaelib.VAE.mlp(x_dim, Z_DIM, hidden=HIDDEN, activation="tanh", likelihood="bernoulli").to(dev)
    if train_epochs:
        vaelib.fit(vae, train_x, epochs=train_epochs, batch_size=100, lr=1e-3, device=dev, seed=seed, progress=False)
    del train_x, test_x
    x = x.to(dev)

    # Warm-up (kernels, allocator, libraries), not timed.
    vaelib.log_likelihood(vae, x[: min(n, 10)], k=min(k, 100), progress=False)
    memory = PeakMemory(dev)
    memory.start()
    torch.manual_seed(seed)
    log_px, seconds = _record.timed(
        lambda: vaelib.log_likelihood(vae, x, k=k, batch_size=batch_size, progress=False), dev
    )
    peak = memory.stop()
    log_px = log_px.double().cpu()
    full = data == "mnist" and n == available and k == 5000
    return {
        "data": data,
        "model": f"VAE.mlp({x_dim}, {Z_DIM}, hidden={HIDDEN}, activation='tanh', likelihood='bernoulli')",
        "train_epochs": train_epochs,
        "n": n,
        "k": k,
        "subset": (
            f"the full task: all {available} test images, k=5000"
            if full
            else f"a subset: the first {n} of the {available} {data} test images, k={k}"
        ),
        "full_size": full,
        "batch_size": batch_size if batch_size is not None else "default (chosen by log_likelihood for the device)",
        "seconds": round(seconds, 3),
        "samples_per_s": round(n * k / seconds),
        "extrapolated_full_seconds": round(seconds * (available * 5000) / (n * k), 1) if data == "mnist" else None,
        "extrapolation_note": "linear in the number of samples, from this run; not a measurement of the full task",
        **peak,
        "mean_log_likelihood": round(float(log_px.mean()), 3),
        "mean_log_likelihood_se": round(float(log_px.std() / math.sqrt(n)), 3) if n > 1 else None,
        "load_average": _record.load(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loglik", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder with the four MNIST IDX files (default: the embedded digits)")
    parser.add_argument("--n", type=int, help="the first N test images (default: all)")
    parser.add_argument("--k", type=int, default=5000, help="importance samples per image (default 5000)")
    parser.add_argument("--batch-size", type=int, help="images per pass (default: log_likelihood's choice)")
    parser.add_argument("--train-epochs", type=int, default=0, help="train briefly first (default 0: untrained)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for the JSON record (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    figures = run(
        data_dir=args.data_dir,
        n=args.n,
        k=args.k,
        batch_size=args.batch_size,
        train_epochs=args.train_epochs,
        device=args.device,
        seed=args.seed,
    )
    dev = resolve_device(args.device)
    record, path = _record.write("loglik", figures, dev, out=args.out)
    print(
        f"loglik ({record['device_name']}): {figures['subset']}: {figures['seconds']:.2f} s, "
        f"{figures['samples_per_s']:.3g} samples/s, peak memory {figures['peak_memory_mib']:.0f} MiB "
        f"(+{figures['peak_increase_mib']:.0f}); mean log p(x) {figures['mean_log_likelihood']:.2f} -> {path.name}"
    )
    return record


if __name__ == "__main__":
    main()
