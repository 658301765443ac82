"""What only the book's chapters use: the synthesis chapter's figure, image grids and quoting numbers in the text."""

from vaelib.book import glue, plot, slider, synthesis

__all__ = ["glue", "plot", "slider", "synthesis"]
