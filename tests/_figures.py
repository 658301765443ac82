"""What counts as a figure in a chapter, for the tests that check every figure reaches the reader.

A figure cell is a code cell that calls ``plt.show()`` (the book's convention: every
cell that draws ends by showing its figure, which ``test_figures.py`` checks). In an
executed notebook each figure cell must hold an image output (``image/png`` or
``image/svg+xml``): with the Agg backend in the kernel's environment ``plt.show()``
draws nothing, and the page shows no figure.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

IMAGE_TYPES = ("image/png", "image/svg+xml")
_SHOW = re.compile(r"^\s*plt\.show\(\)", re.MULTILINE)
# Calls that create a figure; every cell that makes one must show it.
_DRAWS = re.compile(r"\bplt\.(subplots|figure|subplot_mosaic)\(|\bvaelib\.plot\.")


def source(cell: dict[str, Any]) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def code_cells(path: Path) -> list[dict[str, Any]]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def is_figure_cell(cell: dict[str, Any]) -> bool:
    """Whether the code cell shows a figure (calls ``plt.show()`` on a line of its own)."""
    return cell["cell_type"] == "code" and bool(_SHOW.search(source(cell)))


def draws_a_figure(cell: dict[str, Any]) -> bool:
    """Whether the code cell creates a matplotlib figure."""
    return cell["cell_type"] == "code" and bool(_DRAWS.search(source(cell)))


def figure_count(path: Path) -> int:
    """The number of figures a chapter shows: its figure cells, one figure each."""
    return sum(is_figure_cell(c) for c in code_cells(path))


def image_outputs(cell: dict[str, Any]) -> int:
    """The number of image outputs an executed code cell holds."""
    return sum(any(t in o.get("data", {}) for t in IMAGE_TYPES) for o in cell.get("outputs", []))


def alt_text(cell: dict[str, Any]) -> str:
    """The alt text myst-nb gives the cell's images (``metadata.mystnb.image.alt``), or ''."""
    return str(cell.get("metadata", {}).get("mystnb", {}).get("image", {}).get("alt", ""))


def shows_once_at_the_end(cell: dict[str, Any]) -> bool:
    """Whether ``plt.show()`` is called once, as the cell's last statement."""
    try:
        body = ast.parse(source(cell)).body
    except SyntaxError:
        return False
    calls = [
        node
        for node in ast.walk(ast.Module(body=body, type_ignores=[]))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "plt.show"
    ]
    return len(calls) == 1 and bool(body) and ast.unparse(body[-1]).strip() == "plt.show()"
