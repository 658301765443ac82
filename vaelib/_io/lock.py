"""An exclusive lock on a file, so that two runs never write the same checkpoint or run folder.

The lock is ``fcntl.flock`` on a small lock file that holds the owner's pid.
The kernel releases it when its holder exits, however it exits, so a lock
left behind by a killed process is simply taken over by the next run; the
file is removed on a clean release. Where ``fcntl`` does not exist (Windows)
the lock is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunLocked", "exclusive"]

# Locks this process holds, by lock file: taking one again (fit inside the command line) is a no-op.
_HELD: set[str] = set()
_HELD_GUARD = threading.Lock()


class RunLocked(RuntimeError):
    """Another live process holds the lock of a run folder or checkpoint; the message names its pid."""


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = path.read_text().strip()
        if text.isdigit():
            return f"pid {int(text)}"
    return "a process whose pid is not recorded"


@contextlib.contextmanager
def exclusive(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold an exclusive lock on the lock file ``path`` for the block; raise :class:`RunLocked` if taken.

    Parameters
    ----------
    path : path-like
        The lock file (created, with its folder, if needed).
    what : str
        What is locked, for the message: ``"the run folder runs/x"``.
    """
    path = Path(path)
    key = str(path.resolve())
    with _HELD_GUARD:
        nested = key in _HELD
    if fcntl is None or nested:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(
                f"{what} is in use by another run ({_holder(path)}); wait for it to end or stop it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder may have removed the file between our open and our lock: then
        # the lock is on a file nobody else can see, so try again with the current one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        with _HELD_GUARD:
            _HELD.add(key)
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD.discard(key)
            path.unlink(missing_ok=True)  # while still locked: no one else can hold this file
    finally:
        os.close(fd)
