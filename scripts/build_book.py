"""Build the book with ``jupyter-book build --keep-going``; fail if a notebook did not execute.

Jupyter Book 1 finishes a build, and reports success, even when a notebook
raised an error or passed the cell timeout: the page is built from whatever
executed. myst-nb keeps each notebook's execution result in the Sphinx
environment (``<build>/.doctrees/environment.pickle``: ``succeeded``,
``error``) and writes the traceback to ``<build>/html/reports/<docname>.err.log``.
The environment is the evidence that counts: an incremental build does not
re-execute an unchanged notebook, and its failure from the earlier build
still stands. After building what it can, this script exits with status 1
naming every notebook whose last execution failed (or with jupyter-book's
own status if that is not 0), so a reader never gets a site with a broken
chapter and a success message.

Usage (what ``make book`` and ``make site`` run)::

    python scripts/build_book.py [--root DIR] [-- extra jupyter-book options, e.g. -W -n]
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import subprocess
import sys
from pathlib import Path


def failed_notebooks(build: Path) -> list[tuple[str, str]]:
    """``(docname, error)`` of every notebook whose last execution failed, from the build's environment.

    Falls back to the execution reports under ``html/reports`` if the
    environment cannot be read.
    """
    env_file = build / ".doctrees" / "environment.pickle"
    try:
        with env_file.open("rb") as f:
            env = pickle.load(f)  # the build's own file, written by this jupyter-book
        metadata = env.nb_metadata
        docs = set(env.found_docs)
    except Exception:  # no environment, or one this Sphinx cannot read
        reports = build / "html" / "reports"
        found = reports.rglob("*.err.log") if reports.is_dir() else []
        return sorted((p.relative_to(reports).as_posix()[: -len(".err.log")], "see the report") for p in found)
    failed = []
    for docname in sorted(metadata):
        data = metadata[docname].get("exec_data") or {}
        if docname in docs and data and not data.get("succeeded", True):
            failed.append((docname, str(data.get("error") or "error")))
    return failed


def _notebook_file(root: Path, docname: str) -> str:
    for suffix in (".ipynb", ".md", ".py"):
        if (root / f"{docname}{suffix}").exists():
            return f"{docname}{suffix}"
    return docname


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/build_book.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="the book's folder, with _config.yml (default .)")
    parser.add_argument("--jupyter-book", default=None, help="the jupyter-book command (default: beside python)")
    parser.add_argument("options", nargs="*", help="passed on to jupyter-book build (after --)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    command = args.jupyter_book or str(Path(sys.executable).with_name("jupyter-book"))
    if not Path(command).exists() and shutil.which(command) is None:
        command = shutil.which("jupyter-book") or command
    build = root / "_build"
    status = subprocess.run([command, "build", str(root), "--keep-going", *args.options], check=False).returncode
    failed = failed_notebooks(build)
    if failed:
        print(f"\nThe build finished, but {len(failed)} notebook(s) did not execute:", file=sys.stderr)
        for docname, error in failed:
            report = Path("_build", "html", "reports", f"{docname}.err.log")
            print(f"  {_notebook_file(root, docname)}: {error} (traceback in {report})", file=sys.stderr)
        return 1
    if status != 0:
        print(f"\njupyter-book build exited with status {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
