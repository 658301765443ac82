"""Every GPU figure in one command that keeps to a time budget.

A GPU may be at hand for a few minutes only, so this runs, one after
another and each in its own process, everything a GPU figure is wanted for:

1. ``throughput``: :mod:`benchmarks.throughput` on MNIST (``fit`` against the
   DataLoader loop);
2. ``loglik``: :mod:`benchmarks.loglik`, ``log_likelihood`` with k = 5000 on
   the 10,000 MNIST test images;
3. ``streaming``: :mod:`benchmarks.streaming`, ``fit`` with the data resident
   on the device against streamed from the host (pinned memory, worker
   processes, one batch ahead);
4. ``inference_gaps``: :mod:`benchmarks.inference_gaps` on a shortened
   schedule, the approximation and amortization gaps of a Gaussian and a flow
   encoder trained on MNIST;
5. ``book``: the chapters that train models (6 to 12) executed on the device
   with :func:`benchmarks.book.execute`, each timed (record
   ``book-training-<device>``);
6. ``iwae_table``: :mod:`benchmarks.iwae_table` on a shortened schedule
   (``--iwae-stages``, default 3: 13 passes) for a first comparison with the
   published table.

Each part gets a share of ``--budget`` (seconds; 12%, 8%, 8%, 15%, 27% and 30%) plus
whatever the parts before it left unused, and is stopped when its time is
spent; a part whose time would be under ``--min-part`` seconds is skipped
with a note. Each part writes its own record named by the device
(``throughput-nvidia-h100.json``, ...); this command adds ``gpu-<device>.json``
with every part's status, seconds, record and headline figures, and prints
the same as a summary.

Usage::

    python -m benchmarks.gpu --data-dir DIR --budget 480
    python -m benchmarks.gpu --tiny --budget 120     # seconds on a CPU: tiny settings, the embedded digits
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _record
from vaelib._runtime.devices import resolve_device

PARTS = ("throughput", "loglik", "streaming", "inference_gaps", "book", "iwae_table")
SHARES = {
    "throughput": 0.12,
    "loglik": 0.08,
    "streaming": 0.08,
    "inference_gaps": 0.15,
    "book": 0.27,
    "iwae_table": 0.30,
}
TRAINING_CHAPTERS = (
    "book/06_gradients.ipynb",
    "book/07_training.ipynb",
    "book/08_iwae.ipynb",
    "book/09_tighter_bounds.ipynb",
    "book/10_applications.ipynb",
    "book/11_inference_gaps.ipynb",
    "book/12_rate_distortion.ipynb",
)
# Headline figures copied from each part's record into the summary.
HEADLINES = {
    "throughput": ("ratio", "seconds_per_epoch", "vaelib_images_per_s", "baseline_images_per_s", "bounds_agree"),
    "loglik": ("seconds", "samples_per_s", "subset", "full_size", "peak_mib"),
    "streaming": ("resident_images_per_s", "streamed_images_per_s", "ratio", "workers", "same_weights"),
    "inference_gaps": ("gaussian", "flow"),
    "book": ("total_seconds", "failed"),
    "iwae_table": ("train_seconds_total", "rows"),
}


def commands(args: argparse.Namespace, out: Path, checkpoints: Path) -> dict[str, list[str]]:
    """The command line of each part (without the time limit, which :func:`main` enforces)."""
    py = [sys.executable, "-m"]
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    common = ["--device", args.device, "--out", str(out)]
    if args.tiny:
        chapters = [arg for c in args.chapter for arg in ("--chapter", c)]
        throughput = ["--train-size", "128", "--epochs", "2", "--repeats", "1", "--eval-k", "2"]
        iwae = ["--smoke", "--stages", "1", "--eval-k", "5", "--models", "vae-k1"]
        tiny_gaps = ["--train-size", "200", "--epochs", "1", "--n", "4", "--k", "20", "--k-elbo", "10", "--steps", "3"]
        return {
            "throughput": [*py, "benchmarks.throughput", *common, *throughput],
            "loglik": [*py, "benchmarks.loglik", *common, "--n", "20", "--k", "50"],
            "streaming": [
                *py,
                "benchmarks.streaming",
                *common,
                "--train-size",
                "256",
                "--epochs",
                "2",
                "--repeats",
                "1",
            ],
            "inference_gaps": [*py, "benchmarks.inference_gaps", *common, *tiny_gaps],
            "book": [*py, "benchmarks.gpu", "--part", "book", *common, *chapters],
            "iwae_table": [*py, "benchmarks.iwae_table", *common, *iwae, "--checkpoint-dir", str(checkpoints)],
        }
    chapters = [arg for c in (args.chapter or TRAINING_CHAPTERS) for arg in ("--chapter", c)]
    iwae = ["--stages", str(args.iwae_stages), "--checkpoint-dir", str(checkpoints)]
    gaps = ["--epochs", "10", "--n", "300", "--steps", "200"]  # a first figure within its share
    return {
        "throughput": [*py, "benchmarks.throughput", *common, *data, "--repeats", "2"],
        "loglik": [*py, "benchmarks.loglik", *common, *data, "--k", "5000"],
        "streaming": [*py, "benchmarks.streaming", *common, *data, "--epochs", "3", "--repeats", "2"],
        "inference_gaps": [*py, "benchmarks.inference_gaps", *common, *data, *gaps],
        "book": [*py, "benchmarks.gpu", "--part", "book", *common, *chapters],
        "iwae_table": [*py, "benchmarks.iwae_table", *common, *data, *iwae],
    }


def record_path(part: str, out: Path, device: torch.device, tiny: bool, data_dir: str | None) -> Path:
    """Where ``part`` writes its record."""
    slug = _record.device_slug(device)
    data = "" if data_dir and not tiny else "-digits"
    name = {
        "throughput": f"throughput{data}",
        "loglik": f"loglik{data}",
        "streaming": f"streaming{data}",
        "inference_gaps": f"inference_gaps{data}",
        "book": "book-training",
        "iwae_table": "iwae_table-smoke" if tiny or not data_dir else "iwae_table",
    }[part]
    return out / f"{name}-{slug}.json"


def run_part(command: list[str], limit: float, log: Path) -> tuple[str, float]:
    """Run one part for at most ``limit`` seconds; return its status and wall seconds."""
    start = time.perf_counter()
    env = {**os.environ, "VAELIB_PROGRESS": "0"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_record.ROOT), env.get("PYTHONPATH")) if p)
    with log.open("w") as f:
        proc = subprocess.Popen(command, cwd=_record.ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            status = "ok" if proc.wait(timeout=limit) == 0 else f"failed (exit status {proc.returncode})"
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            status = f"stopped at its limit of {limit:.0f} s"
    return status, time.perf_counter() - start


def book_part(args: argparse.Namespace) -> None:
    """``--part book``: execute the training chapters, each timed, and write ``book-training-<device>``."""
    from benchmarks import book

    os.environ.update(book.ENVIRONMENT)
    rows = []
    for chapter in args.chapter or TRAINING_CHAPTERS:
        path = (_record.ROOT / chapter).resolve()
        row = {"notebook": chapter, **book.execute(path, timeout=args.cell_timeout, kernel=None)}
        rows.append(row)
        print(f"  {chapter}: {row['seconds']:.1f} s, {row['status']}", flush=True)
    device = resolve_device(args.device)
    figures = {
        "notebooks": rows,
        "total_seconds": round(sum(r["seconds"] for r in rows), 2),
        "failed": [r["notebook"] for r in rows if r["status"] != "ok"],
    }
    _record.write("book", figures, device, name="book-training", out=args.out)


def headline(part: str, path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    return {key: record[key] for key in HEADLINES[part] if key in record}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder with the four MNIST IDX files (needed unless --tiny)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything (default 480)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cpu or mps (default auto)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"a subset of {','.join(PARTS)}")
    parser.add_argument("--iwae-stages", type=int, default=3, help="stages of the IWAE schedule (default 3)")
    parser.add_argument("--chapter", action="append", default=[], help="a notebook for the book part (repeatable)")
    parser.add_argument("--cell-timeout", type=int, default=300, help="seconds per notebook cell (default 300)")
    parser.add_argument("--min-part", type=float, default=20, help="skip a part with less time than this (default 20)")
    parser.add_argument("--tiny", action="store_true", help="tiny settings on the embedded digits, for a CPU test")
    parser.add_argument("--out", help="folder for the records (default benchmarks/results)")
    parser.add_argument("--part", choices=("book",), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part == "book":
        book_part(args)
        return None
    if args.data_dir is None and not args.tiny:
        parser.error("--data-dir: the MNIST folder is needed (or --tiny for a test on the embedded digits)")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if any(p not in PARTS for p in parts) or args.budget <= 0:
        parser.error(f"--parts: a subset of {','.join(PARTS)}; --budget: a positive number of seconds")

    start = time.perf_counter()
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else _record.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-benchmarks-"))
    cmds = commands(args, out, work / "iwae_checkpoints")
    share_total = sum(SHARES[p] for p in parts)
    summary: dict[str, Any] = {}
    saved = 0.0  # seconds earlier parts left unused
    for i, part in enumerate(parts):
        left = args.budget - (time.perf_counter() - start)
        limit = min(left, args.budget * SHARES[part] / share_total + saved)
        if i == len(parts) - 1:
            limit = left
        if limit < args.min_part:
            summary[part] = {"status": f"skipped: {max(limit, 0):.0f} s left of the budget, under {args.min_part:.0f}"}
            print(f"{part:11s} {summary[part]['status']}", flush=True)
            saved = max(limit, 0.0)
            continue
        path = record_path(part, out, device, args.tiny, args.data_dir)
        before = path.stat().st_mtime if path.exists() else None
        status, seconds = run_part(cmds[part], limit, work / f"{part}.log")
        saved = max(limit - seconds, 0.0)
        fresh = path.exists() and path.stat().st_mtime != before
        entry: dict[str, Any] = {
            "status": status,
            "seconds": round(seconds, 1),
            "limit_seconds": round(limit, 1),
            "command": _record.command(cmds[part][2].split(".")[-1], cmds[part][3:]),
            "record": path.name if fresh else None,
            "figures": headline(part, path) if fresh else {},
        }
        if status != "ok":
            entry["log_tail"] = (work / f"{part}.log").read_text(errors="replace").splitlines()[-8:]
        summary[part] = entry
        print(f"{part:11s} {status}, {seconds:.0f} s of {limit:.0f}; record {entry['record']}", flush=True)
    figures = {
        "budget_seconds": args.budget,
        "seconds": round(time.perf_counter() - start, 1),
        "tiny": args.tiny,
        "parts": summary,
    }
    record, path = _record.write("gpu", figures, device, out=out)
    print(f"all parts in {figures['seconds']:.0f} s of {args.budget:.0f}; wrote {path}")
    return record


if __name__ == "__main__":
    main()
