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

:mod:`vaelib.book.slider` shows the frames: :func:`~vaelib.book.slider.plot_frame`
draws one with matplotlib, :func:`~vaelib.book.slider.interactive` puts it behind
ipywidgets sliders in a live notebook, and :func:`~vaelib.book.slider.slider_html`
renders all frames as a self-contained HTML and JavaScript figure that works on a
static page with no kernel. The chapter "Three roads, one number" uses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from vaelib._checks import check_positive_int
from vaelib.bounds import elbo_from_log_weights, iwae_from_log_weights, log_weights
from vaelib.toy import LinearGaussian, as_multivariate_normal

__all__ = ["GapFrames", "bound_estimate", "gap_frames", "jensen_gap"]


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
