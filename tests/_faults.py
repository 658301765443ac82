"""Faults the reliability tests inject (a disk that fills up, a lock held by another process) and what they leave."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import vaelib._io.atomic
import vaelib._io.lock


class FullDisk:
    """Stands for a file system that fills up: file writes fail with ENOSPC once armed.

    The first ``after`` files opened by vaelib's atomic writer are written normally; every later one
    raises ``OSError(ENOSPC)`` on its first write.
    """

    def __init__(self, monkeypatch, after: int) -> None:
        self.calls, self.after, real = 0, after, os.fdopen

        def fdopen(fd, *args, **kwargs):
            f = real(fd, *args, **kwargs)
            self.calls += 1
            if self.calls <= self.after:
                return f
            f.close()
            broken = real(os.open(os.devnull, os.O_WRONLY), "wb")

            def write(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            broken.write = write
            return broken

        monkeypatch.setattr(vaelib._io.atomic.os, "fdopen", fdopen)


# Run as `python -c HOLD_LOCK PATH`: holds the lock on PATH until a line arrives on stdin. It loads
# vaelib/_io/lock.py alone, so it starts without importing torch.
HOLD_LOCK = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_lock", {vaelib._io.lock.__file__!r})
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
with lock.exclusive(sys.argv[1], "test"):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def one_line_error(capsys) -> str:
    """The single stderr line of a failed command (no traceback)."""
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def temporaries(folder: Path) -> list[str]:
    """The names of the temporary files an interrupted atomic write left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))
