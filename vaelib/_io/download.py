"""Copying a URL into a file within a byte limit and a total deadline.

``urllib``'s timeout bounds each wait for the server, not the whole transfer:
a server sending a byte a second keeps a download alive forever, and one that
sends without end fills the disk. :func:`fetch` counts the bytes and lowers
the socket's timeout to the time left before every read.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["fetch"]


def fetch(url: str, out: BinaryIO, max_bytes: int, timeout: float) -> None:
    """Copy ``url`` into ``out``: at most ``max_bytes`` bytes, within ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    late = f"not complete after {timeout:g} s (the deadline for one file)"

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(late)
        return remaining

    try:
        _copy(url, out, max_bytes, left)
    except TimeoutError as err:  # the socket's timeouts are the time left, so any of them is the deadline
        raise TimeoutError(late) from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise TimeoutError(late) from err
        raise


def _copy(url: str, out: BinaryIO, max_bytes: int, left: Callable[[], float]) -> None:
    with urllib.request.urlopen(url, timeout=left()) as resp:
        length = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise OSError(f"the server announces {int(length)} bytes, more than the {max_bytes} expected")
        # The socket's timeout bounds each wait; it is lowered to the time left before every read.
        sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
        total = 0
        while True:
            if sock is not None:
                sock.settimeout(left())
            chunk = resp.read1(1 << 16) if hasattr(resp, "read1") else resp.read(1 << 16)
            left()
            if not chunk:
                return
            total += len(chunk)
            if total > max_bytes:
                raise OSError(f"the server sent more than the {max_bytes} bytes expected; cut off")
            out.write(chunk)
