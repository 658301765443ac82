"""vaelib._io.lock: one holder of a run's lock across processes, and the same process may take it again."""

from __future__ import annotations

import os
import subprocess
import sys

from tests._faults import HOLD_LOCK
from vaelib._io.lock import exclusive

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "VAELIB_PROGRESS": "0", "MPLBACKEND": "Agg"}


def test_lock_is_exclusive_between_processes_and_reentrant_within_one(tmp_path):
    """A second holder in another process is refused; fit inside the command line's lock is not."""
    lock = tmp_path / ".lock"
    with exclusive(lock, "the folder"):
        with exclusive(lock, "the folder"):  # the same process: a no-op
            pass
        probe = subprocess.run(
            [sys.executable, "-c", HOLD_LOCK, str(lock)], input="\n", capture_output=True, text=True, env=ENV
        )
        assert probe.returncode != 0 and f"in use by another run (pid {os.getpid()})" in probe.stderr
    assert not lock.exists()
