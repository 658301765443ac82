"""When and how to show progress bars.

A bar is shown in a terminal and in a live notebook that can draw widgets, and
never in a non-interactive run (a book build, a test, a log file). The
environment variable ``VAELIB_PROGRESS`` (``0`` or ``1``) overrides the guess;
the ``progress`` argument of each function overrides both.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from tqdm import std as _tqdm_std


def _in_live_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    ip = shell.get_ipython()
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def _has_widgets() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


def progress_enabled(progress: bool | None) -> bool:
    """Resolve ``progress=None`` to a yes or no (see the module docstring)."""
    if progress is not None:
        return bool(progress)
    env = os.environ.get("VAELIB_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("", "0", "false", "no", "off")
    if sys.stderr is not None and sys.stderr.isatty():
        return True
    return _in_live_notebook() and _has_widgets()


def progress_bar(enabled: bool, **kwargs: Any) -> Any:
    """A tqdm bar (a widget in notebooks that can draw one, text elsewhere), or ``None``."""
    if not enabled:
        return None
    if _in_live_notebook() and _has_widgets():
        from tqdm.notebook import tqdm

        return tqdm(**kwargs)
    return _tqdm_std.tqdm(**kwargs)
