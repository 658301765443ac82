"""The chapters' sources follow the book's house rules (CONTRIBUTING.md, "Notebooks")."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import _figures

BOOK = Path(__file__).resolve().parents[1] / "book"
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))
MAX_CELL_LINES = 30


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_no_code_cell_is_longer_than_thirty_lines(chapter):
    """A cell computes, checks, plots or glues: one thing, at most 30 lines, read in one glance."""
    long = {
        i: n
        for i, cell in enumerate(_figures.code_cells(chapter))
        if (n := len(_figures.source(cell).splitlines())) > MAX_CELL_LINES
    }
    assert long == {}, f"code cells (counted from 0) over {MAX_CELL_LINES} lines: {long}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapters_use_the_current_api(chapter):
    """No chapter names a function or keyword the package no longer has (prose included)."""
    text = chapter.read_text()
    gone = [
        "iwae_objective",
        "renyi_objective",
        "BetaObjective",
        "from_linear_gaussian",
        "vaelib.synthesis",
        "vaelib.plot.",
        "vaelib.callbacks",
        "vaelib.checkpoint",
        "vaelib.train.",
        "kl_warmup_epochs=",
        "valid_k=",
        "restore_best=",
        "resume=True",
        "matmul_precision=",
        "loader_workers=",
    ]
    found = [name for name in gone if name in text]
    assert found == [], f"{chapter.name} still names {found}"
