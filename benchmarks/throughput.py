"""Training throughput: :func:`vaelib.fit` against a DataLoader loop written the usual way.

Both ways train the same model from the same initial weights with the same
data, batch size, optimizer (Adam, lr 1e-3), number of steps and per-batch
dynamic binarization:

* **baseline**: ``DataLoader(TensorDataset(x), batch_size=128, shuffle=True)``,
  ``.to(device)`` per batch, ``torch.bernoulli`` per batch, ``loss.item()``
  every step;
* **vaelib**: ``vaelib.fit(vae, x, batch_size=128, lr=1e-3)``.

The first epoch of every run is a warm-up and is not timed; the two ways
alternate in order across repeats so a drift in the machine's load does not
favour one. Speed may not come from doing less work, so both trained models
are scored with the same held-out ELBO (test images binarized once, the same
samples for both) and the record says whether the two agree within the
run-to-run noise.

Usage::

    python -m benchmarks.throughput --data-dir DIR            # MNIST, 784-400-20
    python -m benchmarks.throughput                           # the embedded 8x8 digits, 64-400-20
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import vaelib
from benchmarks import _record
from vaelib._runtime.devices import float32_matmul_precision, resolve_device

BATCH_SIZE = 128
LR = 1e-3
Z_DIM = 20
HIDDEN = (400,)


def load_data(data_dir: str | None, train_size: int | None) -> tuple[str, torch.Tensor, torch.Tensor]:
    """``(name, train_x, test_x)``: MNIST from ``data_dir``, or the embedded digits without one."""
    if data_dir is not None:
        name, (train_x, test_x) = "mnist", vaelib.data.load_mnist(data_dir)
    else:
        name, (train_x, test_x) = "digits", vaelib.data.load_digits()
    if train_size is not None:
        train_x = train_x[:train_size]
    return name, train_x, test_x


def train_baseline(
    vae: vaelib.VAE, x: torch.Tensor, epochs: int, device: torch.device, seed: int, matmul_precision: str
) -> dict:
    """The usual loop; returns per-epoch wall seconds and training bounds."""
    with float32_matmul_precision(matmul_precision):
        return _usual_loop(vae, x, epochs, device, seed)


def _usual_loop(vae: vaelib.VAE, x: torch.Tensor, epochs: int, device: torch.device, seed: int) -> dict:
    torch.manual_seed(seed)
    vae.to(device).train()
    opt = torch.optim.Adam(vae.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(x), batch_size=BATCH_SIZE, shuffle=True)
    seconds, bounds = [], []
    for _ in range(epochs):
        _record.synchronize(device)
        start = time.perf_counter()
        total = 0.0
        for (xb,) in loader:
            xb = torch.bernoulli(xb.to(device))
            loss = -vae.elbo(xb).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * xb.shape[0]
        _record.synchronize(device)
        seconds.append(time.perf_counter() - start)
        bounds.append(-total / x.shape[0])
    vae.eval()
    return {"seconds": seconds, "train_bound": bounds}


def train_vaelib(
    vae: vaelib.VAE, x: torch.Tensor, epochs: int, device: torch.device, seed: int, matmul_precision: str
) -> dict:
    """``vaelib.fit``; epoch times are the wall time between its end-of-epoch callbacks."""
    stamps: list[float] = []
    _record.synchronize(device)
    start = time.perf_counter()
    with vaelib.training_precision(matmul_precision):
        history = vaelib.fit(
            vae,
            x,
            epochs=epochs,
            batch_size=BATCH_SIZE,
            lr=LR,
            device=device,
            seed=seed,
            progress=False,
            callbacks=[lambda h: stamps.append(time.perf_counter())],
        )
    seconds = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    return {"seconds": seconds, "train_bound": list(history.train_bound)}


# The ways compared: how each trains, and the precision of its float32 matrix products.
WAYS: dict[str, tuple[Callable[..., dict], str]] = {
    "baseline": (train_baseline, "highest"),
    "vaelib": (train_vaelib, "medium"),
    "vaelib_fp32": (train_vaelib, "highest"),
}


@torch.no_grad()
def heldout_elbo(vae: vaelib.VAE, x: torch.Tensor, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """Per-image ELBO with ``k`` samples, under a fixed seed (the same draws for every model)."""
    vae.eval()
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, x.shape[0], 1000):
            out.append(vae.elbo(x[i : i + 1000].to(device), k=k).cpu())
    return torch.cat(out).double()


def _timed_rate(runs: list[dict], n: int) -> tuple[float, float]:
    """Images per second and seconds per epoch: the median timed epoch over every run.

    The first (warm-up) epoch of each run is left out. The median, not the
    mean, so that a burst of load from another process on a shared machine
    does not decide the figure; the record keeps every epoch's time.
    """
    seconds = statistics.median(t for r in runs for t in r["seconds"][1:])
    return n / seconds, seconds


def run(
    *,
    data_dir: str | None,
    epochs: int,
    repeats: int,
    device: str,
    train_size: int | None,
    eval_k: int,
    seed: int,
) -> dict[str, Any]:
    """Train every way ``repeats`` times and return the record's figures."""
    if epochs < 2:
        raise ValueError(f"epochs: expected at least 2 (the first is a warm-up and is not timed), got {epochs}")
    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, got {repeats}")
    dev = resolve_device(device)
    data, train_x, test_x = load_data(data_dir, train_size)
    x_dim = train_x.shape[1]
    torch.manual_seed(seed)
    initial = vaelib.VAE.mlp(x_dim, Z_DIM, hidden=HIDDEN, activation="relu", likelihood="bernoulli")
    test_bin = vaelib.data.binarize(test_x, generator=torch.Generator().manual_seed(seed))
    load_before = _record.load()

    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    scores: dict[str, list[torch.Tensor]] = {way: [] for way in WAYS}
    names = list(WAYS)
    for r in range(repeats):
        # Rotate which way goes first, so a change in load hits all alike.
        for way in names[r % len(names) :] + names[: r % len(names)]:
            vae = copy.deepcopy(initial)
            train, matmul_precision = WAYS[way]
            result = train(vae, train_x, epochs, dev, seed + 1 + r, matmul_precision)
            runs[way].append(result)
            epochs_s = ", ".join(f"{t:.2f}" for t in result["seconds"])
            print(f"  repeat {r + 1}, {way}: epoch seconds {epochs_s} (the first untimed)", flush=True)
            scores[way].append(heldout_elbo(vae, test_bin, eval_k, seed, dev))

    n = train_x.shape[0]
    rate = {way: _timed_rate(runs[way], n) for way in WAYS}
    heldout = {way: [float(s.mean()) for s in scores[way]] for way in WAYS}
    fast = _compare(scores["vaelib"], scores["baseline"])
    fp32 = _compare(scores["vaelib_fp32"], scores["baseline"])
    same_loop = _compare(scores["vaelib"], scores["vaelib_fp32"])  # only the precision differs
    return {
        "data": data,
        "model": f"VAE.mlp({x_dim}, {Z_DIM}, hidden={HIDDEN}, activation='relu', likelihood='bernoulli')",
        "train_images": n,
        "test_images": test_x.shape[0],
        "batch_size": BATCH_SIZE,
        "optimizer": f"Adam(lr={LR})",
        "epochs": epochs,
        "steps_per_epoch": math.ceil(n / BATCH_SIZE),
        "repeats": repeats,
        "warmup": "the first epoch of every run is not timed",
        "statistic": "median over the timed epochs of all repeats",
        "matmul_precision": {way: p for way, (_, p) in WAYS.items()},
        "baseline_images_per_s": round(rate["baseline"][0], 1),
        "vaelib_images_per_s": round(rate["vaelib"][0], 1),
        "vaelib_fp32_images_per_s": round(rate["vaelib_fp32"][0], 1),
        "ratio": round(rate["vaelib"][0] / rate["baseline"][0], 3),
        "ratio_fp32": round(rate["vaelib_fp32"][0] / rate["baseline"][0], 3),
        "seconds_per_epoch": round(rate["vaelib"][1], 6),
        "vaelib_fp32_seconds_per_epoch": round(rate["vaelib_fp32"][1], 6),
        "baseline_seconds_per_epoch": round(rate["baseline"][1], 6),
        "per_repeat_ratio": _per_repeat_ratio(runs["vaelib"], runs["baseline"], n),
        "per_repeat_ratio_fp32": _per_repeat_ratio(runs["vaelib_fp32"], runs["baseline"], n),
        **{f"{way}_final_bound": round(statistics.fmean(r["train_bound"][-1] for r in runs[way]), 3) for way in WAYS},
        "heldout_elbo_k": eval_k,
        **{f"{way}_heldout_elbo": [round(v, 3) for v in heldout[way]] for way in WAYS},
        "heldout_difference": fast["difference"],
        "heldout_noise_se": fast["noise_se"],
        "bounds_agree": fast["agree"],
        "heldout_difference_fp32": fp32["difference"],
        "heldout_noise_se_fp32": fp32["noise_se"],
        "bounds_agree_fp32": fp32["agree"],
        "precision_heldout_difference": same_loop["difference"],
        "precision_heldout_noise_se": same_loop["noise_se"],
        "precision_bounds_agree": same_loop["agree"],
        "precision_heldout_difference_per_repeat": same_loop["per_repeat"],
        "bounds_agree_rule": (
            "|mean held-out ELBO (one way) - mean held-out ELBO (the other)| <= 3 x the standard error of that "
            "difference (evaluation noise of the paired per-image difference, plus the run-to-run spread "
            "across repeats when there are at least 2); heldout_difference is vaelib - baseline, "
            "heldout_difference_fp32 vaelib_fp32 - baseline, precision_heldout_difference vaelib - vaelib_fp32"
        ),
        "per_run": runs,
        "load_average_before": load_before,
        "load_average_after": _record.load(),
    }


def _per_repeat_ratio(fast: list[dict], slow: list[dict], n: int) -> list[float]:
    return [round(_timed_rate([f], n)[0] / _timed_rate([s], n)[0], 3) for f, s in zip(fast, slow, strict=True)]


def _compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, Any]:
    """Mean held-out ELBO of way ``a`` minus way ``b``, its standard error, whether they agree, and per repeat.

    The standard error adds the evaluation noise (the per-image paired difference:
    the same test images and draws for both, averaged over repeats) and the
    run-to-run noise (the spread of each way's mean across repeats).
    """
    repeats = len(a)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    eval_se = math.sqrt(sum(float(d.var() / d.numel()) for d in diffs)) / repeats
    means_a, means_b = [float(x.mean()) for x in a], [float(y.mean()) for y in b]
    run_se = math.sqrt((statistics.variance(means_a) + statistics.variance(means_b)) / repeats) if repeats >= 2 else 0.0
    noise = math.hypot(eval_se, run_se)
    difference = statistics.fmean(means_a) - statistics.fmean(means_b)
    return {
        "difference": round(difference, 3),
        "noise_se": round(noise, 3),
        "agree": abs(difference) <= 3 * noise,
        "per_repeat": [round(x - y, 3) for x, y in zip(means_a, means_b, strict=True)],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder with the four MNIST IDX files (default: the embedded digits)")
    parser.add_argument(
        "--epochs", type=int, help="epochs per run, the first untimed (default 3 on MNIST, 11 on digits)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way, alternating (default 3)")
    parser.add_argument("--train-size", type=int, help="use only the first N training images (fewer steps)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU")
    parser.add_argument("--eval-k", type=int, default=10, help="samples per image of the held-out ELBO (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for the JSON record (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    figures = run(
        data_dir=args.data_dir,
        epochs=args.epochs if args.epochs is not None else (3 if args.data_dir is not None else 11),
        repeats=args.repeats,
        device=args.device,
        train_size=args.train_size,
        eval_k=args.eval_k,
        seed=args.seed,
    )
    dev = resolve_device(args.device)
    record, path = _record.write("throughput", figures, dev, out=args.out)
    f = figures
    print(
        f"throughput ({f['data']}, {record['device_name']}): baseline {f['baseline_images_per_s']:.0f} images/s, "
        f"vaelib {f['vaelib_images_per_s']:.0f} images/s, ratio {f['ratio']:.2f}x, {f['seconds_per_epoch']:.3f} "
        f"s/epoch (float32 products: {f['ratio_fp32']:.2f}x); held-out ELBO difference "
        f"{f['heldout_difference']:+.2f} +- {f['heldout_noise_se']:.2f} nats "
        f"(float32: {f['heldout_difference_fp32']:+.2f} +- {f['heldout_noise_se_fp32']:.2f}) -> {path.name}"
    )
    return record


if __name__ == "__main__":
    main()
