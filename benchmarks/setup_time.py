"""A fresh set-up, timed: the README's two commands on a fresh clone, split into their parts.

The repository is cloned (``git clone`` of the committed state) into a
temporary folder, and there the README's commands run as a reader runs them,
each part timed on its own:

* **environment**: ``make install`` (the virtual environment with the pinned
  packages; ``--installer pip`` forces pip, ``auto`` lets the Makefile use
  uv, installing it from the package index when it is not on PATH);
* **mathjax**: ``make mathjax`` (npm fetches MathJax into ``book/_static``);
* **book**: ``make book``, which executes every notebook and builds the site.
  The Sphinx environment keeps each notebook's execution time, so the record
  splits the build into **notebooks** (their sum) and **site** (the rest).

``make test`` is the other README command; it runs the whole test suite and
the browser, and is not timed here (``--phases`` lists the parts to run).
Record ``setup_time-<installer>-cpu.json``: the seconds of each part, the
installer the Makefile used, each notebook's execution time and whether it
succeeded, the load average before and after, the size of the package caches
(uv's, pip's and npm's) before the run, since a warm cache turns minutes of
downloads into seconds, and the tail of any failing command's log.

Usage::

    python -m benchmarks.setup_time --installer pip     # before: the environment made by pip
    python -m benchmarks.setup_time --installer auto    # after: uv where it can be had
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _record

PHASES = ("environment", "mathjax", "book")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "CONDA_"))}
    env.pop("PYTHONPATH", None)
    return env


def run_phase(target: str, clone: Path, make_args: list[str], log: Path) -> dict[str, Any]:
    """``make TARGET`` in the clone, timed; its output goes to ``log``."""
    start = time.perf_counter()
    with log.open("w") as f:
        status = subprocess.run(
            ["make", target, *make_args], cwd=clone, env=_env(), stdout=f, stderr=subprocess.STDOUT, check=False
        ).returncode
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"seconds": round(seconds, 1), "status": status}
    text = log.read_text(errors="replace")
    result["log_lines"] = text.count("\n")
    # "warning" as a word (WARNING:, UserWarning, a warning), not inside a setting's name (suppress_warnings=[])
    word = re.compile(r"(?<![a-z_])warning(?![a-z_])|[a-z]warning\b", re.IGNORECASE)
    warnings = [line for line in text.splitlines() if word.search(line)]
    result["warning_lines"] = len(warnings)
    # The kinds of warning, each once (digits and quoted names folded), so a record shows where they come from.
    kinds = {re.sub(r"'[^']*'|\d+", "_", w): w for w in warnings}
    result["warning_kinds"] = [w[:200] for w in list(kinds.values())[:10]]
    if status != 0:
        result["log_tail"] = text.splitlines()[-20:]
    return result


def installer_used(clone: Path) -> str | None:
    """The installer the Makefile wrote into the environment's stamp file, if any."""
    stamp = clone / ".venv" / ".installed"
    if stamp.exists():
        return stamp.read_text().strip() or None
    return None


def execution_times(clone: Path) -> list[dict[str, Any]]:
    """Each executed notebook's docname, seconds and success, from the Sphinx environment of the build."""
    env_file = clone / "_build" / ".doctrees" / "environment.pickle"
    code = (
        "import pickle, json, sys\n"
        "env = pickle.load(open(sys.argv[1], 'rb'))\n"
        "rows = [{'notebook': d, 'seconds': round(m['exec_data']['runtime'], 1),"
        " 'succeeded': bool(m['exec_data']['succeeded'])}\n"
        "        for d, m in sorted(env.nb_metadata.items()) if m.get('exec_data')]\n"
        "print(json.dumps(rows))\n"
    )
    python = clone / ".venv" / "bin" / "python"
    if not env_file.exists() or not python.exists():
        return []
    # The environment is unpickled by the clone's own Sphinx, not this interpreter's.
    out = subprocess.run([str(python), "-c", code, str(env_file)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return []
    return json.loads(out.stdout)


def package_caches() -> dict[str, float]:
    """MiB held by uv's, pip's and npm's download caches (0 where a cache is absent)."""
    home, xdg = Path.home(), os.environ.get("XDG_CACHE_HOME")
    cache = Path(xdg) if xdg else home / ".cache"
    folders = {
        "uv": Path(os.environ.get("UV_CACHE_DIR") or cache / "uv"),
        "pip": Path(os.environ.get("PIP_CACHE_DIR") or cache / "pip"),
        "npm": Path(os.environ.get("npm_config_cache") or home / ".npm"),
    }
    sizes = {}
    for name, folder in folders.items():
        total = 0
        for root, _, files in os.walk(folder):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_size
                except OSError:
                    pass
        sizes[name] = round(total / 2**20, 1)
    return sizes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.setup_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--installer", choices=("auto", "pip"), default="auto", help="pip forces pip (default auto)")
    parser.add_argument("--phases", default=",".join(PHASES), help="parts to run (default: all three)")
    parser.add_argument("--repo", default=str(_record.ROOT), help="repository to clone (default this one)")
    parser.add_argument("--keep", action="store_true", help="keep the clone and print where it is")
    parser.add_argument("--clone", help="go on in a clone kept by an earlier run (--keep) instead of a fresh one")
    parser.add_argument("--out", help="folder for the JSON record (default benchmarks/results)")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if any(p not in PHASES for p in phases):
        parser.error(f"--phases: expected some of {', '.join(PHASES)}")
    make_args = ["UV="] if args.installer == "pip" else []

    load_before = _record.load()
    caches = package_caches()
    start = time.perf_counter()
    if args.clone is not None:
        clone = Path(args.clone).resolve()
        folder = clone.parent
        args.keep = True
    else:
        folder = Path(tempfile.mkdtemp(prefix="setup-time-"))
        clone = folder / "repo"
        subprocess.run(["git", "clone", "--quiet", args.repo, str(clone)], check=True)
    clone_seconds = time.perf_counter() - start
    parts: dict[str, Any] = {}
    for phase in phases:
        target = {"environment": "install"}.get(phase, phase)
        parts[phase] = run_phase(target, clone, make_args, folder / f"{phase}.log")
        print(f"{phase:12s} {parts[phase]['seconds']:7.1f} s  (exit status {parts[phase]['status']})", flush=True)
        if parts[phase]["status"] != 0:
            break
    if "book" in parts:
        notebooks = execution_times(clone)
        executed = round(sum(n["seconds"] for n in notebooks), 1)
        parts["notebooks"] = {"seconds": executed, "per_notebook": notebooks}
        parts["site"] = {"seconds": round(parts["book"]["seconds"] - executed, 1)}
    figures = {
        "installer_asked": args.installer,
        "fresh_clone": args.clone is None,
        "installer_used": installer_used(clone),
        "clone_seconds": round(clone_seconds, 1),
        "package_caches_mib": caches,
        "parts": parts,
        "total_seconds": round(sum(parts[p]["seconds"] for p in phases if p in parts), 1),
        "load_average_before": load_before,
        "load_average_after": _record.load(),
    }
    name = f"setup_time-{args.installer}" + ("" if args.clone is None else "-" + "-".join(phases))
    record, path = _record.write("setup_time", figures, torch.device("cpu"), name=name, out=args.out)
    print(f"total {record['total_seconds']} s; wrote {path}")
    if args.keep:
        print(f"the clone is in {clone}")
    else:
        subprocess.run(["rm", "-rf", str(folder)], check=False)
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
