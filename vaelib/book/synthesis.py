"""Three roads, one number: every bound of the book for a grid of Gaussian ``q``.

For one observation of a linear-Gaussian model with a one-dimensional latent,
:func:`gap_frames` moves :math:`q = \\mathcal{N}(\\mu + \\delta s, (r s)^2)`
over a grid of shifts :math:`\\delta` and widths :math:`r` (in units of the
posterior's mean :math:`\\mu` and standard deviation :math:`s`) and records, for
each frame, the quantities that the three roads relate:

.. math::

    \\log p(x) = \\mathcal{L}(q) + \\mathrm{KL}(q \\,\\Vert\\, p(z \\mid x)),
    \\qquad
    \\mathcal{L}(q) = \\mathbb{E}_q[\\log p(x \\mid z)] - \\mathrm{KL}(q \\,\\Vert\\, p(z))
    = \\mathcal{L}_1 \\le \\mathcal{L}_k \\le \\log p(x).

:func:`plot_frame` draws one frame with matplotlib, :func:`interactive` puts it
behind ipywidgets sliders in a live notebook, and :func:`slider_html` renders
all frames as a self-contained HTML and JavaScript figure that works on a
static page with no kernel. The chapter "Three roads, one number" uses them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from vaelib._checks import check_positive_int
from vaelib.book.slider import SLIDER_TEMPLATE, table_rows
from vaelib.bounds import elbo_from_log_weights, iwae_from_log_weights, log_weights
from vaelib.toy import LinearGaussian, as_multivariate_normal

__all__ = ["GapFrames", "bound_estimate", "gap_frames", "interactive", "jensen_gap", "plot_frame", "slider_html"]


@dataclass(frozen=True)
class GapFrames:
    """The bounds of every frame; tensors of shape ``(S, W)`` are indexed by (shift, width)."""

    shifts: Tensor  # (S,): q's mean is posterior_loc + shift * posterior_scale
    widths: Tensor  # (W,): q's scale is width * posterior_scale
    loc: Tensor  # (S, W)
    scale: Tensor  # (S, W)
    log_px: float
    posterior_loc: float
    posterior_scale: float
    elbo: Tensor  # (S, W), exact
    kl_prior: Tensor  # (S, W), KL(q || p(z)), exact
    kl_posterior: Tensor  # (S, W), KL(q || p(z | x)), exact
    ks: tuple[int, ...]
    iwae: Tensor  # (len(ks), S, W), Monte Carlo estimates of L_k
    iwae_se: Tensor  # (len(ks), S, W), their standard errors


def _check_1d(t: Any, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"{name}: expected a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    return t


def gap_frames(
    toy: LinearGaussian,
    x: Tensor,
    shifts: Tensor,
    widths: Tensor,
    ks: tuple[int, ...] = (10, 100, 1000),
    *,
    draws: int = 8192,
    seed: int = 0,
) -> GapFrames:
    """Exact ELBO and KLs, and Monte Carlo :math:`\\mathcal{L}_k`, for every Gaussian ``q`` of a grid.

    With the posterior :math:`p(z \\mid x) = \\mathcal{N}(\\mu, s^2)`, frame
    ``(i, j)`` is :math:`q = \\mathcal{N}(\\mu + \\delta_i s, (r_j s)^2)`. The ELBO
    is ``toy.elbo`` (closed form), the KLs come from ``kl_divergence``, and

    .. math::

        \\hat{\\mathcal{L}}_k = \\frac{1}{R} \\sum_{m=1}^{R}
        \\log \\frac{1}{k} \\sum_{i=1}^{k} \\frac{p(x, z_{mi})}{q(z_{mi})},
        \\qquad z_{mi} = \\mu + \\delta s + r s\\, \\epsilon_{mi},

    with the same standard normal :math:`\\epsilon` for every frame (common random
    numbers), so the estimates change smoothly from frame to frame.

    Parameters
    ----------
    toy : LinearGaussian
        A model with ``z_dim == 1``.
    x : Tensor
        One observation, shape ``(1, x_dim)``.
    shifts : Tensor
        Offsets :math:`\\delta` of q's mean, in posterior standard deviations, shape ``(S,)``.
    widths : Tensor
        q's scales :math:`r`, in posterior standard deviations, shape ``(W,)``; positive.
    ks : tuple of int
        Numbers of importance samples for the bounds :math:`\\mathcal{L}_k`.
    draws : int
        Weights drawn per bound and frame: :math:`\\mathcal{L}_k` averages ``R = draws // k``
        independent estimates, so every ``k`` costs the same (``R`` at least 2, for a standard error).
    seed : int
        Seed of the draws.

    Returns
    -------
    GapFrames
        ``elbo``, ``kl_prior``, ``kl_posterior`` of shape ``(S, W)``; ``iwae`` and
        ``iwae_se`` of shape ``(len(ks), S, W)``.

    References
    ----------
    Burda, Grosse and Salakhutdinov (2015), "Importance Weighted Autoencoders", eq. (8) and Theorem 1.
    """
    if not isinstance(toy, LinearGaussian):
        raise TypeError(f"toy: expected a LinearGaussian, got {type(toy).__name__}")
    if toy.z_dim != 1:
        raise ValueError(f"toy: expected z_dim == 1, got {toy.z_dim}")
    if not isinstance(x, Tensor) or x.shape != (1, toy.x_dim):
        raise ValueError(f"x: expected a tensor of shape (1, {toy.x_dim}), got {getattr(x, 'shape', type(x))}")
    shifts, widths = _check_1d(shifts, "shifts"), _check_1d(widths, "widths")
    if not bool((widths > 0).all()):
        raise ValueError("widths: expected positive values")
    ks = tuple(ks)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks: expected a non-empty tuple of positive ints, got {ks}")
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 2 * max(ks):
        raise ValueError(f"draws: expected an int >= 2 * max(ks) = {2 * max(ks)}, got {draws!r}")

    dtype = toy.W.dtype
    shifts, widths = shifts.to(dtype), widths.to(dtype)
    posterior = toy.posterior(x)  # batch (1,), event (1,)
    mu, s = posterior.mean[0, 0], posterior.stddev[0, 0]
    loc = mu + shifts[:, None] * s + 0 * widths  # (S, W)
    scale = (widths * s).expand_as(loc)  # (S, W)
    q = Independent(Normal(loc[..., None], scale[..., None]), 1)  # batch (S, W), event (1,)
    frames = loc.shape
    q_mvn = as_multivariate_normal(q)
    elbo = toy.elbo(x.expand(*frames, -1), q_mvn)  # (S, W)
    kl_prior = kl_divergence(q_mvn, toy.prior)  # (S, W)
    kl_posterior = kl_divergence(q_mvn, posterior.expand(frames))  # (S, W)

    g = torch.Generator().manual_seed(seed)
    iwae = torch.empty(len(ks), *frames, dtype=dtype)
    iwae_se = torch.empty_like(iwae)
    for n, k in enumerate(ks):
        repeats = draws // k
        eps = torch.randn(k, repeats, generator=g, dtype=dtype)  # (k, R), shared by every frame
        for i in range(frames[0]):
            q_row = Independent(Normal(loc[i, :, None], scale[i, :, None]), 1)  # batch (W,)
            z = loc[i, :, None] + scale[i, :, None] * eps[:, :, None, None]  # (k, R, W, 1)
            log_w = toy.log_joint(x, z) - q_row.log_prob(z)  # (k, R, W)
            bound = iwae_from_log_weights(log_w.reshape(k, -1)).reshape(repeats, -1)  # (R, W)
            iwae[n, i] = bound.mean(0)
            iwae_se[n, i] = bound.std(0) / math.sqrt(repeats)
    return GapFrames(
        shifts=shifts,
        widths=widths,
        loc=loc,
        scale=scale,
        log_px=float(toy.log_marginal(x)[0]),
        posterior_loc=float(mu),
        posterior_scale=float(s),
        elbo=elbo,
        kl_prior=kl_prior,
        kl_posterior=kl_posterior,
        ks=ks,
        iwae=iwae,
        iwae_se=iwae_se,
    )


def jensen_gap(
    x: Tensor, q: Distribution, log_joint: Callable[[Tensor, Tensor], Tensor], n: int = 400_000
) -> tuple[Tensor, Tensor]:
    """Jensen's gap :math:`\\log \\mathbb{E}_q[w] - \\mathbb{E}_q[\\log w]` by Monte Carlo, and its standard error.

    .. math::

        \\widehat{\\Delta} = \\log \\frac{1}{n} \\sum_{i=1}^n w_i - \\frac{1}{n} \\sum_{j=1}^n \\log w'_j,
        \\qquad w_i, w'_j \\text{ from independent draws of } q,

    which estimates :math:`\\log p(x) - \\mathcal{L}(q) = \\mathrm{KL}(q \\,\\Vert\\, p(z \\mid x))`. The
    standard error adds the two variances; that of :math:`\\log \\bar w` is, to first order, the
    variance of :math:`w / \\bar w` over ``n`` (the delta method).

    Parameters
    ----------
    x : Tensor, shape (batch, x_dim)
    q : Distribution
        Batch shape ``(batch,)``, with ``rsample``.
    log_joint : callable
        As for :func:`vaelib.bounds.log_weights`.
    n : int
        Draws for each of the two averages.

    Returns
    -------
    tuple of Tensor, shapes (batch,) and (batch,)
        The gap and its standard error.

    References
    ----------
    Jensen (1906); Burda, Grosse and Salakhutdinov (2015), section 3.
    """
    check_positive_int(n, "n")
    if n < 2:
        raise ValueError(f"n: expected at least 2 draws, got {n}")
    log_w = log_weights(x, q, log_joint, n)  # (n, batch)
    log_w_mean = log_weights(x, q, log_joint, n)  # (n, batch), independent
    log_mean_w = iwae_from_log_weights(log_w_mean)  # (batch,)
    se = (log_w.var(0) / n + (log_w_mean - log_mean_w).exp().var(0) / n).sqrt()
    return log_mean_w - elbo_from_log_weights(log_w), se


def bound_estimate(
    x: Tensor,
    q: Distribution,
    log_joint: Callable[[Tensor, Tensor], Tensor],
    k: int,
    *,
    draws: int = 200_000,
) -> tuple[Tensor, Tensor]:
    """:math:`\\mathcal{L}_k` as the mean of ``draws // k`` independent estimates, and its standard error.

    .. math::

        \\hat{\\mathcal{L}}_k = \\frac{1}{R} \\sum_{m=1}^{R} \\log \\frac{1}{k} \\sum_{i=1}^{k} w_{mi},
        \\qquad R = \\lfloor \\text{draws} / k \\rfloor,

    so that every ``k`` costs the same number of weights.

    Parameters
    ----------
    x : Tensor
        One observation, shape ``(1, x_dim)``.
    q : Distribution
        Batch shape ``(1,)``, with ``rsample`` and ``expand``.
    log_joint : callable
        As for :func:`vaelib.bounds.log_weights`.
    k : int
        Importance samples per estimate.
    draws : int
        Weights in all; at least ``2 * k``.

    Returns
    -------
    tuple of Tensor, shapes () and ()
        The estimate of :math:`\\mathcal{L}_k` and its standard error.

    References
    ----------
    Burda, Grosse and Salakhutdinov (2015), eq. (8).
    """
    check_positive_int(k, "k")
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 2 * k:
        raise ValueError(f"draws: expected an int >= 2 * k = {2 * k}, got {draws!r}")
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"x: expected one observation of shape (1, x_dim), got {getattr(x, 'shape', type(x))}")
    reps = draws // k
    log_w = log_weights(x.expand(reps, -1), q.expand((reps,)), log_joint, k)  # (k, reps)
    estimates = iwae_from_log_weights(log_w)  # (reps,)
    return estimates.mean(), estimates.std() / math.sqrt(reps)


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
        From :func:`gap_frames`.
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
        "__ROWS__": table_rows(frames),
    }
    html = SLIDER_TEMPLATE
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
