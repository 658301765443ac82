"""Wall time of executing every notebook of the book, one by one, in the order of ``_toc.yml``.

Each notebook runs top to bottom in a fresh kernel with nbclient, from its own
folder, with ``VAELIB_PROGRESS=0`` and the kernel's inline matplotlib backend
(as ``make book`` runs them, figures drawn); its time includes the kernel's start. Markdown pages in the table
of contents are skipped; the executed notebooks are not written back. The
budget (CONTRIBUTING.md) is 90 seconds per notebook and 10 minutes in all on a
2-core CPU.

Usage::

    python -m benchmarks.book                       # the book's _toc.yml
    python -m benchmarks.book --toc OTHER/_toc.yml
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path
from typing import Any

import nbformat
import yaml
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from benchmarks import _record
from vaelib._runtime.devices import default_device

NOTEBOOK_BUDGET_S = 90.0
TOTAL_BUDGET_S = 600.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
ENVIRONMENT = {"VAELIB_PROGRESS": "0", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


def toc_files(toc: dict | list) -> list[str]:
    """Every ``file`` entry of a Jupyter Book table of contents, in reading order (``root`` first)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    found.append(node[key])
            for value in node.values():
                if isinstance(value, (dict, list)):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return found


def notebooks(toc_path: Path) -> tuple[list[Path], list[str]]:
    """The notebooks listed in ``toc_path`` that exist, in order, and the entries found neither as notebook nor page."""
    entries = toc_files(yaml.safe_load(toc_path.read_text()))
    found, missing = [], []
    for entry in entries:
        base = toc_path.parent / entry
        candidates = [base] if base.suffix else [base.with_suffix(".ipynb"), base.with_suffix(".md")]
        existing = [c for c in candidates if c.is_file()]
        if not existing:
            missing.append(entry)
        elif existing[0].suffix == ".ipynb":
            found.append(existing[0])
    return found, missing


def execute(path: Path, *, timeout: int, kernel: str | None) -> dict[str, Any]:
    """Run one notebook in a fresh kernel; return its wall seconds and whether every cell ran."""
    nb = nbformat.read(path, as_version=4)
    options: dict[str, Any] = {"timeout": timeout, "resources": {"metadata": {"path": str(path.parent)}}}
    if kernel is not None:
        options["kernel_name"] = kernel
    client = NotebookClient(nb, **options)
    start = time.perf_counter()
    status, error = "ok", None
    try:
        client.execute()
    except CellTimeoutError as err:
        status, error = "timeout", str(err).strip().splitlines()[0]
    except (CellExecutionError, DeadKernelError) as err:
        lines = [line for line in _ANSI.sub("", str(err)).strip().splitlines() if line.strip()]
        status, error = "error", lines[-1] if lines else type(err).__name__
    seconds = time.perf_counter() - start
    cells = sum(1 for cell in nb.cells if cell.cell_type == "code")
    return {"seconds": round(seconds, 2), "status": status, "error": error, "code_cells": cells}


def run(*, toc: Path, timeout: int, kernel: str | None) -> dict[str, Any]:
    """Execute every notebook of ``toc`` in order and return the record's figures."""
    os.environ.update(ENVIRONMENT)  # inherited by every kernel started below
    os.environ.pop("MPLBACKEND", None)  # the kernels draw inline, as in the book's build
    paths, missing = notebooks(toc)
    load_before = _record.load()
    rows = []
    for path in paths:
        row = {"notebook": path.relative_to(toc.parent).as_posix(), **execute(path, timeout=timeout, kernel=kernel)}
        row["within_budget"] = row["seconds"] <= NOTEBOOK_BUDGET_S
        rows.append(row)
        print(f"  {row['notebook']}: {row['seconds']:.1f} s, {row['status']}", flush=True)
    total = round(sum(r["seconds"] for r in rows), 2)
    return {
        "environment": ENVIRONMENT,
        "notebooks": rows,
        "executed": len(rows),
        "failed": [r["notebook"] for r in rows if r["status"] != "ok"],
        "missing": missing,
        "total_seconds": total,
        "slowest": max(rows, key=lambda r: r["seconds"])["notebook"] if rows else None,
        "notebook_budget_s": NOTEBOOK_BUDGET_S,
        "total_budget_s": TOTAL_BUDGET_S,
        "all_within_budget": all(r["within_budget"] for r in rows) and total <= TOTAL_BUDGET_S,
        "load_average_before": load_before,
        "load_average_after": _record.load(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.book", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--toc", default=str(_record.ROOT / "_toc.yml"), help="the table of contents (default: the book's)"
    )
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    parser.add_argument("--kernel", help="kernel name (default: each notebook's own, else python3)")
    parser.add_argument("--out", help="folder for the JSON record (default benchmarks/results)")
    args = parser.parse_args(argv)
    toc = Path(args.toc).resolve()
    if not toc.is_file():
        parser.error(f"--toc: no such file: {args.toc}")
    figures = run(toc=toc, timeout=args.timeout, kernel=args.kernel)
    # Notebooks pick their device with vaelib.default_device(); so does the record.
    device = default_device()
    record, path = _record.write("book", figures, device, out=args.out)
    print(
        f"book ({record['device_name']}): {figures['executed']} notebooks in {figures['total_seconds']:.1f} s, "
        f"slowest {figures['slowest']}, {len(figures['failed'])} failed, {len(figures['missing'])} missing; "
        f"within budget: {figures['all_within_budget']} -> {path.name}"
    )
    if figures["failed"]:
        raise SystemExit(1)
    return record


if __name__ == "__main__":
    main()
