"""vaelib._io.atomic: temporaries of dead writers are cleaned up, and importing vaelib leaves the umask alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from vaelib._io.atomic import remove_stale_temporaries

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "VAELIB_PROGRESS": "0", "MPLBACKEND": "Agg"}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_clean_up_removes_only_temporaries_of_dead_writers(tmp_path):
    """A temporary named with a live pid belongs to a write in progress and stays; dead ones go."""
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    names = [
        f".checkpoint.pt.{live.pid}.0a1b2c3d.tmp",
        f".checkpoint.pt.{dead.pid}.0a1b2c3d.tmp",
        ".checkpoint.pt.k2j3h4_x.tmp",  # an older writer's name, without a pid
    ]
    try:
        for name in names:
            (tmp_path / name).write_bytes(b"partial")
        removed = remove_stale_temporaries(tmp_path, ("checkpoint.pt",))
        assert sorted(p.name for p in removed) == sorted(names[1:])
        assert temporaries(tmp_path) == [names[0]]
    finally:
        live.kill()
        live.wait(30)


def test_importing_vaelib_leaves_the_umask_alone(tmp_path):
    """The umask is process-wide: reading it at import (set, then restore) races with threads."""
    probe = textwrap.dedent(
        """
        import os
        calls = []
        real = os.umask
        os.umask = lambda mask: calls.append(mask) or real(mask)
        import vaelib
        vaelib.save(vaelib.VAE.mlp(4, 2, hidden=(3,)), os.path.join(os.environ["OUT"], "m.pt"))
        print(calls)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={**ENV, "OUT": str(tmp_path)}
    )
    assert child.returncode == 0 and child.stdout == "[]\n", child.stderr[-2000:]
