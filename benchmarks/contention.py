"""Training beside other trainings: ``vaelib.fit`` timed on a quiet CPU and with 1 and 2 others running.

Two workloads, each timed in a fresh process:

* **book**: the training cell of the chapter "Training a VAE",
  ``VAE.mlp(64, 8, hidden=(128, 128))`` on the embedded digits, 20 epochs;
* **throughput**: the throughput benchmark's model, ``VAE.mlp(784, 20,
  hidden=(400,), activation="relu")`` at batch 128, on MNIST with
  ``--data-dir`` (``--throughput-epochs``, default 1), else ``VAE.mlp(64, 20,
  ...)`` on the digits (default 20 epochs).

Each is timed with 0, 1 and 2 other trainings running beside it: separate
processes that repeat the book's training cell (``--book-epochs``) until they
are stopped, as a reader with two notebooks open would run them. The other trainings use the
same thread policy as the timed one. ``--policy`` picks the policies compared:
``auto`` is vaelib's (:mod:`vaelib._runtime.threads`), ``torch`` leaves torch's thread
count alone, as vaelib did before (``VAELIB_CPU_THREADS=torch``); by default
both are run, so the record carries the figures before and after.

A timed process runs ``fit`` ``--repeats`` times (default 3) and the figure is
the median. Record: per workload, policy and number of others, the seconds of
each run, the median, the ratio to the quiet median of the same policy, and
the load average before and after; ``targets`` says whether, with the vaelib
policy, one other training costs at most 2.5 times the quiet time
(``one_beside_ratio``) and the quiet time is no worse than before
(``quiet_vs_torch``, at most 1.05).

Usage::

    python -m benchmarks.contention                    # digits for both workloads
    python -m benchmarks.contention --data-dir DIR     # MNIST for the throughput model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _record

POLICIES = ("auto", "torch")
WORKLOADS = ("book", "throughput")
ROOT = Path(__file__).resolve().parents[1]
ONE_BESIDE_TARGET = 2.5
QUIET_TOLERANCE = 1.05


def _env(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(VAELIB_PROGRESS="0", MPLBACKEND="Agg", VAELIB_CPU_THREADS=policy)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _workload(name: str, data_dir: str | None, epochs: int | None) -> tuple[Any, Any, dict[str, Any]]:
    """The model, the data and fit's keywords of a workload."""
    import vaelib

    torch.manual_seed(0)
    if name == "book":
        x, _ = vaelib.data.load_digits()
        return vaelib.VAE.mlp(64, 8, hidden=(128, 128)), x, {"epochs": epochs or 20}
    if data_dir is not None:
        x, _ = vaelib.data.load_mnist(data_dir)
        vae = vaelib.VAE.mlp(784, 20, hidden=(400,), activation="relu")
        return vae, x, {"epochs": epochs or 1, "batch_size": 128}
    x, _ = vaelib.data.load_digits()
    vae = vaelib.VAE.mlp(64, 20, hidden=(400,), activation="relu")
    return vae, x, {"epochs": epochs or 20, "batch_size": 128}


def worker(args: argparse.Namespace) -> None:
    """``--worker time``: print the seconds of each fit; ``--worker other``: train until stopped."""
    import vaelib

    name = args.workload if args.worker == "time" else "book"
    vae, x, kwargs = _workload(name, args.data_dir, args.epochs)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    seconds = []
    runs = args.repeats if args.worker == "time" else None
    i = 0
    while runs is None or i < runs:
        vae.load_state_dict(state)
        start = time.perf_counter()
        vaelib.fit(vae, x, device="cpu", seed=i, progress=False, **kwargs)
        seconds.append(time.perf_counter() - start)
        if runs is None and i == 0:
            print("ready", flush=True)
        i += 1
    print(json.dumps({"seconds": seconds, "threads_after": torch.get_num_threads()}), flush=True)


def _start_others(n: int, policy: str, epochs: int | None) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "benchmarks.contention", "--worker", "other"]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=_env(policy),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    for p in procs:  # running, past the imports and the first training
        line = p.stdout.readline() if p.stdout else ""
        if line.strip() != "ready":
            _stop(procs)
            raise RuntimeError(f"a background training did not start (exit status {p.poll()})")
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def measure(workload: str, policy: str, others: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``workload`` under ``policy`` with ``others`` trainings beside it."""
    load_before = _record.load()
    procs = _start_others(others, policy, args.book_epochs)
    try:
        cmd = [sys.executable, "-m", "benchmarks.contention", "--worker", "time", "--workload", workload]
        cmd += ["--repeats", str(args.repeats)]
        if args.data_dir is not None:
            cmd += ["--data-dir", args.data_dir]
        epochs = args.book_epochs if workload == "book" else args.throughput_epochs
        if epochs is not None:
            cmd += ["--epochs", str(epochs)]
        out = subprocess.run(cmd, cwd=ROOT, env=_env(policy), capture_output=True, text=True, check=True)
    finally:
        _stop(procs)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "seconds": [round(s, 3) for s in result["seconds"]],
        "median_seconds": round(statistics.median(result["seconds"]), 3),
        "load_average_before": load_before,
        "load_average_after": _record.load(),
    }


def summarize(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Ratios to the quiet time of the same policy, and the targets for the vaelib policy."""
    targets: dict[str, Any] = {}
    for workload, by_policy in results.items():
        for cells in by_policy.values():
            quiet = cells.get("0", {}).get("median_seconds")
            for cell in cells.values():
                if quiet:
                    cell["ratio_to_quiet"] = round(cell["median_seconds"] / quiet, 2)
        auto, old = by_policy.get("auto", {}), by_policy.get("torch", {})
        t: dict[str, Any] = {}
        if "1" in auto:
            t["one_beside_ratio"] = auto["1"]["ratio_to_quiet"]
            t["one_beside_met"] = t["one_beside_ratio"] <= ONE_BESIDE_TARGET
        if "0" in auto and "0" in old:
            t["quiet_vs_torch"] = round(auto["0"]["median_seconds"] / old["0"]["median_seconds"], 2)
            t["quiet_met"] = t["quiet_vs_torch"] <= QUIET_TOLERANCE
        if "1" in old:
            t["torch_one_beside_ratio"] = old["1"]["ratio_to_quiet"]
        targets[workload] = t
    return targets


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.contention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder with the MNIST IDX files, for the throughput model")
    parser.add_argument("--policy", choices=(*POLICIES, "both"), default="both", help="thread policy (default both)")
    parser.add_argument("--others", default="0,1,2", help="numbers of other trainings beside (default 0,1,2)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="book, throughput or both (default)")
    parser.add_argument("--repeats", type=int, default=3, help="fit runs per timed process (default 3)")
    parser.add_argument("--book-epochs", type=int, help="epochs of the book's cell (default 20)")
    parser.add_argument("--throughput-epochs", type=int, help="epochs of the throughput model (1 MNIST, 20 digits)")
    parser.add_argument("--out", help="folder for the JSON record (default benchmarks/results)")
    parser.add_argument("--worker", choices=("time", "other"), help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=WORKLOADS, default="book", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args)
        return None
    if args.repeats < 1:
        parser.error("--repeats: expected a positive int")
    policies = POLICIES if args.policy == "both" else (args.policy,)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    others = [int(n) for n in args.others.split(",")]
    if any(w not in WORKLOADS for w in workloads) or any(n < 0 for n in others):
        parser.error("--workloads: book and/or throughput; --others: numbers of at least 0")

    results: dict[str, dict[str, dict[str, Any]]] = {w: {p: {} for p in policies} for w in workloads}

    def save(complete: bool) -> tuple[dict[str, Any], Path]:
        # Written after every cell, so a run stopped part-way leaves what it measured.
        figures = {
            "data": "digits" if args.data_dir is None else "mnist",
            "workloads": workloads,
            "policies": list(policies),
            "others": others,
            "repeats": args.repeats,
            "complete": complete,
            "results": results,
            "targets": summarize(results),
        }
        return _record.write("contention", figures, torch.device("cpu"), out=args.out)

    for workload in workloads:
        for n in others:
            for policy in policies:  # alternate, so a drift in load touches both
                cell = measure(workload, policy, n, args)
                results[workload][policy][str(n)] = cell
                print(f"{workload:10s} {policy:5s} {n} beside: {cell['median_seconds']:.2f} s", flush=True)
                save(complete=False)
    record, path = save(complete=True)
    for workload, t in record["targets"].items():
        print(f"{workload}: {t}")
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
