"""vaelib.book.slider: the synthesis chapter's figure, as a static HTML slider, a matplotlib plot and widgets."""

from __future__ import annotations

import json
import re
import sys
import types

import matplotlib
import pytest

from vaelib.book.slider import interactive, plot_frame, slider_html
from vaelib.book.synthesis import GapFrames

matplotlib.use("Agg")


def test_slider_html_embeds_every_frame_and_fetches_nothing(gap_setup):
    """The page holds all frames as JSON, two range inputs, and no address to load anything from."""
    _, _, frames = gap_setup
    html = slider_html(frames, element_id="fig-1")
    (payload,) = re.findall(r'<script type="application/json" class="frames">(.*?)</script>', html, re.S)
    data = json.loads(payload)
    assert len(data["bounds"]) == len(data["loc"]) == 9
    assert data["ks"] == [1, 4, 64]
    # frame (i, j) sits at i * W + j, and its first bound is the ELBO
    assert data["bounds"][2 * 3 + 1][0] == pytest.approx(frames.elbo[2, 1].item(), abs=1e-4)
    assert data["kl_posterior"][5] == pytest.approx(frames.kl_posterior[1, 2].item(), abs=1e-4)
    assert html.count('type="range"') == 2 and 'id="fig-1"' in html and '("fig-1")' in html
    assert not re.search(r"(src|href)=|https?://(?!www\.w3\.org/2000/svg)", html)
    assert "__" not in html.replace("__proto__", "")


def test_slider_html_argument_errors(gap_setup):
    _, _, frames = gap_setup
    with pytest.raises(TypeError, match="frames"):
        slider_html({"elbo": 1})
    with pytest.raises(ValueError, match="element_id"):
        slider_html(frames, element_id='a" onload="x')


def test_plot_frame_and_interactive(gap_setup, monkeypatch):
    """plot_frame draws two panels; interactive is None without ipywidgets."""
    _, _, frames = gap_setup
    fig = plot_frame(frames, 0, 2)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="i, j"):
        plot_frame(frames, 3, 0)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    assert interactive(frames) is None
    assert isinstance(frames, GapFrames)


def test_interactive_wires_two_sliders_to_plot_frame(gap_setup, monkeypatch):
    """With ipywidgets present, interactive() builds two integer sliders over the frames and draws a frame."""
    _, _, frames = gap_setup
    calls = {}

    class IntSlider:
        def __init__(self, value, min, max):
            self.value, self.min, self.max = value, min, max

    def fake_interactive(function, **sliders):
        calls.update(sliders)
        function(**{name: s.value for name, s in sliders.items()})
        return "widget"

    fake = types.SimpleNamespace(IntSlider=IntSlider, interactive=fake_interactive)
    monkeypatch.setitem(sys.modules, "ipywidgets", fake)
    assert interactive(frames) == "widget"
    assert (calls["shift"].min, calls["shift"].max, calls["width"].max) == (0, 2, 2)
    # the frame nearest shift 1 and width 1.5 (1 and 2 are as near; the first wins)
    assert calls["shift"].value == 2 and calls["width"].value == 1
