"""The synthesis chapter's figure: the frames of :func:`vaelib.book.synthesis.gap_frames`, shown.

:func:`plot_frame` draws one frame with matplotlib, :func:`interactive` puts it
behind ipywidgets sliders in a live notebook, and :func:`slider_html` renders
all frames as a self-contained HTML and JavaScript figure: the frames are
embedded as JSON, two range inputs pick a frame, and about a hundred lines of
plain JavaScript redraw an inline SVG.
Nothing is loaded from the network, so it works on a static page offline, in
Jupyter and in Colab. ``__ID__``, ``__DATA__``, ``__SMAX__``, ``__WMAX__``,
``__S0__``, ``__W0__`` and ``__ROWS__`` are filled in by ``slider_html``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Normal

from vaelib.book.synthesis import GapFrames

__all__ = ["interactive", "plot_frame", "slider_html"]


def _table_rows(frames: Any) -> str:
    """The table under the figure: one row per quantity, the value filled in by the script."""
    rows = [
        ("log p(x), exact", f"{frames.log_px:.3f}"),
        ("ELBO = L_1, exact", '<span data-value="elbo"></span>'),
        ("KL(q ‖ p(z))", '<span data-value="kl_prior"></span>'),
        ("E_q[log p(x|z)] = ELBO + KL(q ‖ p(z))", '<span data-value="reconstruction"></span>'),
        ("KL(q ‖ p(z|x)) = log p(x) − ELBO (blue bar)", '<span data-value="kl_posterior"></span>'),
        ("ELBO + KL(q ‖ p(z|x))", '<span data-value="identity"></span>'),
    ]
    rows += [(f"L_{k}, Monte Carlo", f'<span data-value="L{k}"></span>') for k in frames.ks]
    cell = 'style="padding:1px 10px 1px 0"'
    return "".join(f'<tr><td {cell}>{name}</td><td style="text-align:right">{value}</td></tr>' for name, value in rows)


_SLIDER_TEMPLATE = """\
<div id="__ID__" class="vaelib-synthesis" style="max-width:720px;font-family:sans-serif;font-size:13px">
<script type="application/json" class="frames">__DATA__</script>
<div style="display:flex;gap:24px;flex-wrap:wrap">
<label>mean of q <input type="range" name="shift" min="0" max="__SMAX__" step="1" value="__S0__">
<output data-value="loc"></output></label>
<label>scale of q <input type="range" name="width" min="0" max="__WMAX__" step="1" value="__W0__">
<output data-value="scale"></output></label>
</div>
<svg viewBox="0 0 680 290" width="100%" role="img"
 aria-label="the densities of the prior, the posterior and q, and the bounds L_k against k">
<g class="axes"></g>
<path data-role="prior" fill="none" stroke="#888" stroke-width="1.5"></path>
<path data-role="posterior" fill="none" stroke="#000" stroke-width="2" stroke-dasharray="5,3"></path>
<path data-role="q" fill="none" stroke="#d62728" stroke-width="2"></path>
<line data-role="logpx" stroke="#000" stroke-width="2"></line>
<line data-role="gap" stroke="#1f77b4" stroke-width="7" stroke-opacity="0.4"></line>
<path data-role="bounds" fill="none" stroke="#d62728" stroke-width="2"></path>
<g data-role="points" fill="#d62728"></g>
</svg>
<table style="border-collapse:collapse;margin-top:4px"><tbody>__ROWS__</tbody></table>
</div>
<script>
(function (id) {
  "use strict";
  var root = document.getElementById(id);
  if (!root || root.dataset.ready) return;
  root.dataset.ready = "1";
  var d = JSON.parse(root.querySelector("script.frames").textContent);
  var svg = root.querySelector("svg"), NS = "http://www.w3.org/2000/svg";
  var shift = root.querySelector("input[name=shift]"), width = root.querySelector("input[name=width]");
  var A = {x0: 55, x1: 305, y0: 20, y1: 235}, B = {x0: 410, x1: 650, y0: 20, y1: 235};
  function lin(a0, a1, b0, b1) { return function (v) { return b0 + (v - a0) / (a1 - a0) * (b1 - b0); }; }
  function clamp(v, lo, hi) { return Math.max(lo, Math.min(hi, v)); }
  var lk = d.ks.map(function (k) { return Math.log(k) / Math.LN10; });
  var zx = lin(d.zmin, d.zmax, A.x0, A.x1), py = lin(0, d.pmax, A.y1, A.y0);
  var kx = lin(lk[0], lk[lk.length - 1], B.x0 + 20, B.x1 - 10), ny = lin(d.lo, d.hi, B.y1, B.y0);
  function el(name, attrs, parent, text) {
    var e = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (a) { e.setAttribute(a, attrs[a]); });
    if (text !== undefined) e.textContent = text;
    parent.appendChild(e);
    return e;
  }
  function axes(box, xs, xlabels, xtitle, ys, ytitle, fx, fy) {
    var g = root.querySelector("g.axes"), mid = (box.y0 + box.y1) / 2;
    el("path", {d: "M" + box.x0 + "," + box.y0 + "V" + box.y1 + "H" + box.x1, fill: "none", stroke: "#444"}, g);
    xs.forEach(function (v, n) {
      el("text", {x: fx(v), y: box.y1 + 15, "text-anchor": "middle", "font-size": 11}, g, xlabels[n]);
    });
    ys.forEach(function (v) {
      el("text", {x: box.x0 - 5, y: fy(v) + 4, "text-anchor": "end", "font-size": 11}, g, String(v));
    });
    el("text", {x: (box.x0 + box.x1) / 2, y: box.y1 + 32, "text-anchor": "middle", "font-size": 12}, g, xtitle);
    el("text", {x: box.x0 - 38, y: mid, "text-anchor": "middle", "font-size": 12,
      transform: "rotate(-90 " + (box.x0 - 38) + " " + mid + ")"}, g, ytitle);
  }
  function ticks(lo, hi, n) {
    var step = Math.pow(10, Math.floor(Math.log(Math.max((hi - lo) / n, 1e-9)) / Math.LN10)), out = [];
    [1, 2, 5, 10].some(function (m) { if ((hi - lo) / (m * step) <= n) { step *= m; return true; } return false; });
    for (var v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(+v.toFixed(6));
    return out;
  }
  var zt = ticks(d.zmin, d.zmax, 6);
  axes(A, zt, zt.map(String), "z", ticks(0, d.pmax, 4), "density", zx, py);
  axes(B, lk, d.ks.map(String), "number of samples k (log scale)", ticks(d.lo, d.hi, 6), "nats", kx, ny);
  el("text", {x: A.x1, y: A.y0 + 4, "text-anchor": "end", "font-size": 11}, root.querySelector("g.axes"),
    "grey: p(z), dashed: p(z|x), red: q");
  el("text", {x: B.x1, y: B.y1 - 8, "text-anchor": "end", "font-size": 11}, root.querySelector("g.axes"),
    "black: log p(x), red: L_k, blue: KL(q ‖ p(z|x))");
  function density(m, s) {
    var p = "";
    for (var n = 0; n <= 240; n++) {
      var z = d.zmin + (d.zmax - d.zmin) * n / 240, u = (z - m) / s;
      var y = Math.exp(-0.5 * u * u) / (s * Math.sqrt(2 * Math.PI));
      p += (n ? "L" : "M") + zx(z).toFixed(1) + "," + py(Math.min(y, d.pmax)).toFixed(1);
    }
    return p;
  }
  function set(role, attrs) {
    var e = root.querySelector("[data-role=" + role + "]");
    Object.keys(attrs).forEach(function (a) { e.setAttribute(a, attrs[a]); });
  }
  function show(name, v) { root.querySelector("[data-value=" + name + "]").textContent = v.toFixed(3); }
  set("prior", {d: density(0, 1)});
  set("posterior", {d: density(d.mu, d.s)});
  set("logpx", {x1: B.x0, x2: B.x1, y1: ny(d.log_px), y2: ny(d.log_px)});
  var dots = d.ks.map(function () { return el("circle", {r: 3.5}, root.querySelector("[data-role=points]")); });
  function draw() {
    var f = +shift.value * d.widths + +width.value, b = d.bounds[f];
    var pts = b.map(function (v, n) { return [kx(lk[n]), ny(clamp(v, d.lo, d.hi))]; });
    set("q", {d: density(d.loc[f], d.scale[f])});
    var line = pts.map(function (p, n) { return (n ? "L" : "M") + p[0].toFixed(1) + "," + p[1].toFixed(1); });
    set("bounds", {d: line.join("")});
    pts.forEach(function (p, n) {
      dots[n].setAttribute("cx", p[0].toFixed(1));
      dots[n].setAttribute("cy", p[1].toFixed(1));
    });
    set("gap", {x1: kx(lk[0]) - 10, x2: kx(lk[0]) - 10, y1: pts[0][1], y2: ny(d.log_px)});
    show("loc", d.loc[f]);
    show("scale", d.scale[f]);
    show("elbo", b[0]);
    show("kl_prior", d.kl_prior[f]);
    show("reconstruction", b[0] + d.kl_prior[f]);
    show("kl_posterior", d.kl_posterior[f]);
    show("identity", b[0] + d.kl_posterior[f]);
    d.ks.forEach(function (k, n) { if (n) show("L" + k, b[n]); });
  }
  shift.addEventListener("input", draw);
  width.addEventListener("input", draw);
  draw();
})("__ID__");
</script>
"""


def _nearest(values: Tensor, target: float) -> int:
    return int((values - target).abs().argmin())


def slider_html(frames: GapFrames, *, element_id: str = "synthesis-slider") -> str:
    """A self-contained HTML and JavaScript figure of ``frames`` with two sliders.

    The left panel draws the prior, the posterior and the frame's :math:`q`; the
    right panel draws :math:`\\mathcal{L}_1 = \\mathcal{L}(q)` and the
    :math:`\\mathcal{L}_k` of ``frames.ks`` against :math:`k`, the line
    :math:`\\log p(x)`, and the gap :math:`\\mathrm{KL}(q \\,\\Vert\\, p(z \\mid x))`
    as a bar; a table lists every value. The frames travel as JSON inside the
    page and nothing is fetched, so the figure works on a static site offline.

    Parameters
    ----------
    frames : GapFrames
        From :func:`~vaelib.book.synthesis.gap_frames`.
    element_id : str
        The HTML id of the figure, unique on its page.

    Returns
    -------
    str
        HTML for ``IPython.display.HTML``.
    """
    if not isinstance(frames, GapFrames):
        raise TypeError(f"frames: expected GapFrames, got {type(frames).__name__}")
    if not isinstance(element_id, str) or not element_id.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"element_id: expected letters, digits, '-' or '_', got {element_id!r}")
    mu, s = frames.posterior_loc, frames.posterior_scale
    bounds = torch.cat([frames.elbo[None], frames.iwae])  # (1 + len(ks), S, W)
    spread = (frames.shifts.abs().max() + 3 * frames.widths.max()).item() * s
    peak = 1 / (math.sqrt(2 * math.pi) * s * min(1.0, frames.widths.min().item()))
    data = {
        "ks": [1, *frames.ks],
        "widths": len(frames.widths),
        "mu": mu,
        "s": s,
        "log_px": frames.log_px,
        "zmin": math.floor(min(mu - spread, -3.0)),
        "zmax": math.ceil(max(mu + spread, 3.0)),
        "pmax": 1.05 * peak,
        # Far-off frames have ELBOs many nats down; the axis keeps the last few nats legible
        # and the script pins lower values to its bottom (the table shows them all).
        "lo": math.floor(max(min(bounds.min().item(), frames.log_px - 1), frames.log_px - 5)),
        "hi": math.ceil(frames.log_px + 0.5),
        "loc": [round(v, 4) for v in frames.loc.flatten().tolist()],
        "scale": [round(v, 4) for v in frames.scale.flatten().tolist()],
        "kl_prior": [round(v, 4) for v in frames.kl_prior.flatten().tolist()],
        "kl_posterior": [round(v, 4) for v in frames.kl_posterior.flatten().tolist()],
        "bounds": [[round(v, 4) for v in row] for row in bounds.flatten(1).T.tolist()],  # (S * W, 1 + len(ks))
    }
    fill = {
        "__ID__": element_id,
        "__DATA__": json.dumps(data, separators=(",", ":")),
        "__SMAX__": str(len(frames.shifts) - 1),
        "__WMAX__": str(len(frames.widths) - 1),
        "__S0__": str(_nearest(frames.shifts, 1.0)),
        "__W0__": str(_nearest(frames.widths, 1.5)),
        "__ROWS__": _table_rows(frames),
    }
    html = _SLIDER_TEMPLATE
    for key, value in fill.items():
        html = html.replace(key, value)
    return html


def plot_frame(frames: GapFrames, i: int, j: int, *, fig: Any = None) -> Any:
    """Draw frame ``(i, j)`` with matplotlib: the densities, and the bounds against ``k``.

    Returns the figure (two panels, about ``(10, 3.5)`` inches).
    """
    import matplotlib.pyplot as plt

    if not (0 <= i < len(frames.shifts) and 0 <= j < len(frames.widths)):
        raise ValueError(f"i, j: expected a frame in [0, {len(frames.shifts)}) x [0, {len(frames.widths)}), got {i, j}")
    if fig is None:
        fig = plt.figure(figsize=(10, 3.5))
    fig.clear()
    ax0, ax1 = fig.subplots(1, 2)
    mu, s = frames.posterior_loc, frames.posterior_scale
    loc, scale = frames.loc[i, j].item(), frames.scale[i, j].item()
    z = torch.linspace(min(mu, loc) - 4 * max(s, scale), max(mu, loc) + 4 * max(s, scale), 400)
    for dist, style, label in [
        (Normal(0.0, 1.0), dict(color="0.5"), "prior p(z)"),
        (Normal(mu, s), dict(color="k", ls="--"), "posterior p(z | x)"),
        (Normal(loc, scale), dict(color="tab:red"), "q"),
    ]:
        ax0.plot(z, dist.log_prob(z).exp(), label=label, **style)
    ax0.set(xlabel="z", ylabel="density", title=f"q = N({loc:.2f}, {scale:.2f}²)")
    ax0.legend(fontsize=8)
    ks = [1, *frames.ks]
    bounds = [frames.elbo[i, j].item(), *frames.iwae[:, i, j].tolist()]
    ax1.plot(ks, bounds, "o-", color="tab:red", label="$\\mathcal{L}_k$ ($\\mathcal{L}_1$ = ELBO)")
    ax1.axhline(frames.log_px, color="k", label="log p(x)")
    ax1.vlines(1, bounds[0], frames.log_px, color="tab:blue", lw=6, alpha=0.4, label="KL(q ‖ p(z | x))")
    ax1.set(xscale="log", xlabel="number of samples k (log scale)", ylabel="nats")
    ax1.set_title(f"KL(q ‖ p(z)) = {frames.kl_prior[i, j].item():.2f} nats", fontsize=10)
    ax1.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def interactive(frames: GapFrames) -> Any:
    """:func:`plot_frame` behind two ipywidgets sliders, or ``None`` where ipywidgets is not installed."""
    try:
        import ipywidgets  # type: ignore[import-not-found]
    except ImportError:
        return None
    import matplotlib.pyplot as plt

    def show(shift: int, width: int) -> None:
        plot_frame(frames, shift, width)
        plt.show()

    sliders = {
        "shift": ipywidgets.IntSlider(value=_nearest(frames.shifts, 1.0), min=0, max=len(frames.shifts) - 1),
        "width": ipywidgets.IntSlider(value=_nearest(frames.widths, 1.5), min=0, max=len(frames.widths) - 1),
    }
    return ipywidgets.interactive(show, **sliders)
