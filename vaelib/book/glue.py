"""Quote computed numbers in the book's prose.

On the website, :func:`glue` hands a value to MyST-NB so the text can cite it
with ``{glue:text}`name:.3f```; anywhere else (Colab, a plain Jupyter) it just
returns the value, so the notebooks run unchanged without the book toolchain.
"""

from __future__ import annotations

from typing import Any

__all__ = ["glue"]


def glue(name: str, value: Any, display: bool = False) -> Any:
    """Record ``value`` under ``name`` for the book's text, and return it."""
    try:
        from myst_nb import glue as _myst_glue
    except ImportError:
        return value
    _myst_glue(name, value, display=display)
    return value
