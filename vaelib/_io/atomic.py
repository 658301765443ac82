"""Atomic file writes: a temporary file beside the target, flushed, then renamed over it.

A process killed at any moment leaves the previous file or the new one, never
a partial one; a failed write (a full disk) raises :class:`WriteError` saying
that the previous file is intact. Temporaries are named with the writer's pid,
so a clean-up removes only those of writers that are dead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["WriteError", "atomic_write", "remove_stale_temporaries"]


class WriteError(OSError):
    """A file that could not be written (a full disk, say); the previous file under its name is intact."""

    def __str__(self) -> str:
        return str(self.strerror)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; POSIX only (Windows cannot open a folder).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # PermissionError: alive, owned by another user
        return True
    return True


def _temporary_name(path: Path) -> Path:
    # The writer's pid is in the name, so a clean-up can tell a live run's file from a dead one's.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temporaries(folder: str | os.PathLike[str], names: tuple[str, ...]) -> list[Path]:
    """Remove the temporary files that killed writes of ``names`` left in ``folder``; return them.

    Only files whose writer is dead are removed: a temporary named with the
    pid of a live process belongs to a write in progress and is kept.
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            parts = tmp.name[len(name) + 2 :].split(".")
            pid = int(parts[0]) if len(parts) == 3 and parts[0].isdigit() else None
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                continue
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, what: str = "file") -> Path:
    """Write a file with ``write(f)`` to a temporary name beside ``path``, then rename it into place.

    A process killed at any moment leaves either the previous file or the new
    one under ``path``, never a partial one; a killed write can only leave a
    hidden ``.NAME.PID.*.tmp`` file beside it. The folder is created if needed.
    The new file gets the usual permissions (``0o666`` less the umask).

    Raises
    ------
    WriteError
        If the file system refuses the write (no space left, say); the message
        names ``path`` and says that the previous ``what`` is intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        # O_EXCL: never another's file; mode 0o666: the kernel applies the umask, as open() does.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            kept = f"the previous {what} is intact" if path.exists() else f"no {what} was written"
            reason = "no space left on the device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else err.strerror
            raise WriteError(err.errno or errno.EIO, f"{path}: could not be written ({reason or err}); {kept}") from err
        raise
    _fsync_dir(path.parent)
    return path
