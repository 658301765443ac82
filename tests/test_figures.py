"""Every figure a chapter draws is shown, once, with alt text: checked on the notebooks' sources.

The executed notebooks and the built pages are checked against the same count in
``tests/test_browser.py`` (after ``make site``): each figure cell there holds its
image, and each chapter page shows that many decoded images.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import _figures

BOOK = Path(__file__).resolve().parents[1] / "book"
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))


def test_the_figure_helpers_tell_figure_cells_apart():
    show = {"cell_type": "code", "source": ["fig, ax = plt.subplots()\n", "ax.plot([1, 2])\n", "plt.show()\n"]}
    quiet = {"cell_type": "code", "source": ["x = 1  # plt.show() in a comment\n"]}
    drawn = {"cell_type": "code", "source": ["fig, ax = plt.subplots()\n"], "outputs": []}
    assert _figures.is_figure_cell(show) and not _figures.is_figure_cell(quiet)
    assert _figures.draws_a_figure(drawn) and not _figures.is_figure_cell(drawn)
    executed = {**show, "outputs": [{"output_type": "display_data", "data": {"image/png": "iVBOR", "text/plain": ""}}]}
    assert _figures.image_outputs(executed) == 1 and _figures.image_outputs(drawn) == 0


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_figure_is_shown_once(chapter):
    """A cell that creates a figure shows it with one ``plt.show()``: figure cells and figures are as many."""
    cells = _figures.code_cells(chapter)
    unshown = [i for i, c in enumerate(cells) if _figures.draws_a_figure(c) and not _figures.is_figure_cell(c)]
    assert unshown == [], f"code cells {unshown} create a figure but do not call plt.show()"
    twice = [i for i, c in enumerate(cells) if _figures.source(c).count("plt.show()") > 1]
    assert twice == [], f"code cells {twice} show more than one figure; split them"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_figure_has_alt_text(chapter):
    """A screen reader reads each figure's alt text (cell metadata ``mystnb.image.alt``), not its file name."""
    figures = [c for c in _figures.code_cells(chapter) if _figures.is_figure_cell(c)]
    assert figures, f"{chapter.name} shows no figure"
    short = [i for i, c in enumerate(figures) if len(_figures.alt_text(c).split()) < 8]
    assert short == [], f"figures {short} (counted from 0) have no alt text, or less than a sentence"
    tex = [i for i, c in enumerate(figures) if "$" in _figures.alt_text(c) or "\\" in _figures.alt_text(c)]
    assert tex == [], f"figures {tex} have TeX in their alt text, which a screen reader spells out"
