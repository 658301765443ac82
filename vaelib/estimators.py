"""Three gradient estimators of the ELBO, as surrogates to differentiate.

Each returns a per-data-point surrogate whose *value* is a Monte Carlo
estimate of the ELBO and whose *gradient* (by ``backward``) is the estimator:

``"reparam"``
    :math:`z = \\mu + \\sigma \\odot \\epsilon`, differentiate through the sample
    (Kingma and Welling 2013, section 2.4; Rezende et al. 2014).
``"score"``
    the score-function (REINFORCE) estimator
    :math:`\\nabla_\\phi \\mathcal{L} = \\mathbb{E}_q[(f(z) - b) \\nabla_\\phi \\log q_\\phi(z)]`
    with :math:`f = \\log p(x, z) - \\log q_\\phi(z)` and a baseline :math:`b`, zero by default
    (Williams 1992; Paisley et al. 2012).
``"analytic_kl"``
    reparameterized reconstruction term minus the closed-form
    :math:`\\mathrm{KL}(q \\,\\|\\, p(z))` (Kingma and Welling 2013, eq. 10).

The chapter "Optimizing the bound" measures the variance of each.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.distributions import Distribution, kl_divergence

from vaelib._checks import check_choice, check_positive_int
from vaelib._runtime.threads import compute_threads
from vaelib.models import VAE
from vaelib.protocols import JointModel
from vaelib.toy import as_multivariate_normal

__all__ = [
    "ESTIMATORS",
    "GradientStatistics",
    "elbo_surrogate",
    "gradient_samples",
    "gradient_statistics",
    "kl",
    "signal_to_noise",
    "signal_to_noise_from_gram",
]

ESTIMATORS = ("reparam", "score", "analytic_kl")
Estimator = Literal["reparam", "score", "analytic_kl"]


def _likelihood(model: JointModel, z: Tensor) -> Distribution:
    decode = getattr(model, "decode", None)
    if isinstance(model, VAE) or callable(decode):
        decoded: Distribution = model.decode(z)  # type: ignore[attr-defined]
        return decoded
    likelihood = getattr(model, "likelihood", None)
    if not callable(likelihood):
        raise TypeError(
            f"model: the analytic_kl estimator needs model.decode(z) or model.likelihood(z), "
            f"which {type(model).__name__} lacks"
        )
    out: Distribution = likelihood(z)
    return out


def kl(q: Distribution, p: Distribution) -> Tensor:
    """Closed-form :math:`\\mathrm{KL}(q \\,\\|\\, p)`, also between diagonal and full Gaussians."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return kl_divergence(as_multivariate_normal(q), as_multivariate_normal(p))


def elbo_surrogate(
    x: Tensor,
    q: Distribution,
    model: JointModel,
    k: int = 1,
    *,
    estimator: Estimator = "reparam",
    baseline: float | Tensor | None = None,
) -> Tensor:
    """A surrogate of the ELBO whose gradient is the chosen estimator.

    Parameters
    ----------
    x : Tensor, shape (batch, x_dim)
    q : Distribution
        Approximate posterior, batch shape ``(batch,)``, event shape ``(z_dim,)``.
    model : JointModel
        Supplies ``prior`` and ``log_joint`` (and, for ``"analytic_kl"``, the
        likelihood as ``decode(z)`` or ``likelihood(z)``): a ``LinearGaussian``,
        a ``VAE`` or any model of the same shape.
    k : int
        Samples per data point.
    estimator : {"reparam", "score", "analytic_kl"}
    baseline : None, float or Tensor of shape () or (batch,)
        For ``"score"`` only: the constant :math:`b` subtracted from :math:`f`, one number
        or one per data point (detached; it must not depend on the draws). ``None`` is the
        plain estimator, :math:`b = 0`. ``baseline=1.0`` is the surrogate that keeps the
        pathwise term :math:`\\nabla_\\phi f = -\\nabla_\\phi \\log q_\\phi(z)` beside the
        score term, as Pyro's ``Trace_ELBO`` does, since :math:`\\nabla_\\phi f + f \\nabla_\\phi \\log q_\\phi
        = (f - 1) \\nabla_\\phi \\log q_\\phi` (vaelib's score surrogate before the baseline).

    Returns
    -------
    Tensor, shape (batch,)
        Equal in value to a Monte Carlo ELBO estimate for every estimator.

    Notes
    -----
    For ``"score"``, with :math:`z_1, \\dots, z_k \\sim q_\\phi` drawn without a path to
    :math:`\\phi` and :math:`f_i = \\log p_\\theta(x, z_i) - \\log q_\\phi(z_i)`, the surrogate is

    .. math::

        \\frac{1}{k} \\sum_{i=1}^{k} \\Big[\\log p_\\theta(x, z_i) - \\bot(\\log q_\\phi(z_i))
        + \\bot(f_i - b)\\,\\big(\\log q_\\phi(z_i) - \\bot(\\log q_\\phi(z_i))\\big)\\Big],

    where :math:`\\bot` stops gradients. Its value is :math:`\\frac{1}{k} \\sum_i f_i`; its gradient is
    :math:`\\frac{1}{k} \\sum_i (f_i - b) \\nabla_\\phi \\log q_\\phi(z_i)` in :math:`\\phi` (which
    :math:`\\log p_\\theta` does not involve) and
    :math:`\\frac{1}{k} \\sum_i \\nabla_\\theta \\log p_\\theta(x, z_i)` in the model's parameters.
    Both are unbiased for every :math:`b` free of the draws, because
    :math:`\\mathbb{E}_{q_\\phi}[\\nabla_\\phi \\log q_\\phi(z)] = 0`; :math:`b` changes only the
    variance, which the constant :math:`\\mathbb{E}[f \\lVert s \\rVert^2] / \\mathbb{E}\\lVert s \\rVert^2`,
    :math:`s = \\nabla_\\phi \\log q_\\phi(z)`, minimizes (summed over the parameters).

    References
    ----------
    Williams (1992), "Simple statistical gradient-following algorithms for connectionist
    reinforcement learning", section 4 (REINFORCE and its reinforcement baseline); Mohamed et al. (2020),
    "Monte Carlo gradient estimation in machine learning", sections 4 and 7 (control variates).
    """
    check_positive_int(k, "k")
    check_choice(estimator, "estimator", ESTIMATORS)
    b = _check_baseline(baseline, estimator, q.batch_shape)
    if estimator == "reparam":
        z = q.rsample((k,))  # (k, batch, z_dim)
        return (model.log_joint(x, z) - q.log_prob(z)).mean(dim=0)
    if estimator == "analytic_kl":
        z = q.rsample((k,))  # (k, batch, z_dim)
        return _likelihood(model, z).log_prob(x).mean(dim=0) - kl(q, model.prior)
    z = q.sample((k,)).detach()  # (k, batch, z_dim), no path for gradients
    log_q = q.log_prob(z)  # (k, batch)
    log_p = model.log_joint(x, z)  # (k, batch)
    pathwise = log_p - log_q.detach()  # value f; gradient grad log p at fixed z (the decoder's)
    score = log_q - log_q.detach()  # value 0; gradient grad log q
    return (pathwise + ((log_p - log_q).detach() - b) * score).mean(dim=0)


def _check_baseline(baseline: object, estimator: str, batch_shape: torch.Size) -> float | Tensor:
    """``baseline`` as a number or a detached tensor that broadcasts over ``(k, batch)``; ``None`` is 0."""
    if baseline is None:
        return 0.0
    if estimator != "score":
        raise ValueError(f"baseline: only estimator='score' takes a baseline, got one with estimator={estimator!r}")
    if isinstance(baseline, Tensor):
        if baseline.dim() > 0 and baseline.shape != batch_shape:
            raise ValueError(
                f"baseline: expected a number or a tensor of shape () or {tuple(batch_shape)} (one per data point), "
                f"got shape {tuple(baseline.shape)}"
            )
        if not bool(torch.isfinite(baseline).all()):
            raise ValueError("baseline: expected finite values, got a tensor with NaN or infinity")
        return baseline.detach()
    if isinstance(baseline, bool) or not isinstance(baseline, numbers.Real):
        raise TypeError(f"baseline: expected None, a number or a tensor, got {type(baseline).__name__}")
    if not math.isfinite(baseline):
        raise ValueError(f"baseline: expected a finite number, got {baseline}")
    return float(baseline)


def gradient_samples(
    x: Tensor,
    q_params: list[Tensor],
    make_q: Callable[..., Distribution],
    model: JointModel,
    *,
    estimator: Estimator | Callable[..., Tensor],
    n: int,
    k: int = 1,
    batched: bool = False,
) -> Tensor:
    """``n`` independent gradient estimates of the summed ELBO with respect to ``q_params``.

    Parameters
    ----------
    x : Tensor, shape (batch, x_dim)
    q_params : list of Tensor
        Leaf tensors with ``requires_grad=True`` that parameterize ``q``, each
        with the data's batch dimension first, shape ``(batch, ...)``.
    make_q : callable
        ``make_q(*q_params)`` builds the distribution ``q``.
    model : LinearGaussian or VAE
    estimator : {"reparam", "score", "analytic_kl"} or callable
        An ELBO estimator's name, or any surrogate ``estimator(x, q, model, k)`` of shape
        ``(batch,)``, such as :func:`vaelib.iwae_gradients.iwae_surrogate` with its own estimator.
    n : int
        Number of independent estimates.
    k : int
        Samples per estimate.
    batched : bool
        Compute all ``n`` estimates in one backward pass by giving each of ``n``
        copies of the data its own copy of the parameters (much faster for small
        models); by default, one backward pass per estimate.

    Returns
    -------
    Tensor, shape (n, total number of parameters)
        One flattened gradient per row, parameters in order; ``.var(0)`` is the
        estimator's variance.

    Notes
    -----
    On a CPU the work runs on one thread or on torch's count, whichever suits
    its size (and, one estimate at a time, whichever is faster at the moment),
    unless the caller set the count; see :mod:`vaelib._runtime.threads`.
    """
    check_positive_int(n, "n")
    check_positive_int(k, "k")
    if callable(estimator):
        surrogate = estimator
    else:
        check_choice(estimator, "estimator", ESTIMATORS)
        surrogate = functools.partial(elbo_surrogate, estimator=estimator)
    batch = x.shape[0] if x.dim() > 1 else 1
    if batched:
        with compute_threads(x.device, model, n * batch * k, once=True):
            copies = [p.detach().repeat(n, *[1] * (p.dim() - 1)).requires_grad_() for p in q_params]  # (n * batch, ...)
            xs = x.repeat(n, *[1] * (x.dim() - 1))  # (n * batch, x_dim)
            value = surrogate(xs, make_q(*copies), model, k).sum()
            grads = torch.autograd.grad(value, copies)
            return torch.cat([g.reshape(n, -1) for g in grads], dim=1)  # (n, n_params)
    rows = []
    with compute_threads(x.device, model, batch * k) as step:
        for _ in range(n):
            with step():
                value = surrogate(x, make_q(*q_params), model, k).sum()
                grads = torch.autograd.grad(value, q_params)
                rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)  # (n, n_params)


@dataclass(frozen=True)
class GradientStatistics:
    """Per-parameter mean, variance and signal-to-noise ratio of ``n`` gradient draws, each ``(n_params,)``."""

    mean: Tensor
    variance: Tensor
    snr: Tensor
    n: int


def _snr(r: Tensor, mean_sq: Tensor, sum_sq: Tensor) -> Tensor:
    """The one definition: SNR from ``r`` draws, the squared norm of their mean and the sum of squared norms."""
    noise = (sum_sq - r * mean_sq) / (r - 1)  # the unbiased total variance
    signal = (mean_sq - noise / r).clamp(min=0)  # E||mean||^2 = ||E g||^2 + tr(Cov) / r
    return (signal / noise).sqrt()


def signal_to_noise(grads: Tensor, counts: Tensor | None = None) -> Tensor:
    """The signal-to-noise ratio of a gradient estimator over a block of parameters, bias-corrected.

    .. math::

        \\mathrm{SNR} = \\frac{\\lVert \\mathbb{E}[g] \\rVert}{\\sqrt{\\mathbb{E}\\lVert g - \\mathbb{E}[g] \\rVert^2}},
        \\qquad \\widehat{\\lVert \\mathbb{E} g \\rVert^2} = \\lVert \\bar g \\rVert^2 - \\frac{\\hat\\sigma^2}{r},

    from ``r`` draws (the rows of ``grads``), where :math:`\\hat\\sigma^2` is the unbiased total
    variance; the correction removes the noise that :math:`\\lVert \\bar g \\rVert^2` holds. For one
    parameter (a single column) it is :math:`|\\mathbb{E} g| / \\sqrt{\\operatorname{Var} g}`.

    Parameters
    ----------
    grads : Tensor, shape (n, n_params)
        One gradient estimate per row, ``n >= 2``.
    counts : Tensor, shape (n,), optional
        How many times each row counts (a bootstrap resample); all ones by default.

    Returns
    -------
    Tensor, shape ()

    References
    ----------
    Rainforth et al. (2018), "Tighter variational bounds are not necessarily better", eq. (6).
    """
    grads = _check_grads(grads)
    c = torch.ones(grads.shape[0], dtype=grads.dtype) if counts is None else counts.to(grads.dtype)
    r = c.sum()
    mean = c @ grads / r  # (n_params,)
    return _snr(r, mean.pow(2).sum(), c @ grads.pow(2).sum(dim=1))


def signal_to_noise_from_gram(gram: Tensor, counts: Tensor | None = None) -> Tensor:
    """:func:`signal_to_noise` from the Gram matrix :math:`G = g g^\\top` of the draws, shape (n, n).

    The same ratio: :math:`\\lVert \\bar g \\rVert^2 = c^\\top G c / r^2` and
    :math:`\\sum_i c_i \\lVert g_i \\rVert^2 = c^\\top \\operatorname{diag} G`, so a bootstrap over the
    draws costs :math:`O(n^2)` per resample, whatever the number of parameters.
    """
    if not isinstance(gram, Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 2:
        raise ValueError(f"gram: expected a square matrix of at least 2 draws, got {getattr(gram, 'shape', gram)}")
    c = torch.ones(gram.shape[0], dtype=gram.dtype) if counts is None else counts.to(gram.dtype)
    r = c.sum()
    return _snr(r, c @ gram @ c / r**2, c @ gram.diagonal())


def _check_grads(grads: Tensor) -> Tensor:
    if not isinstance(grads, Tensor):
        raise TypeError(f"grads: expected a torch.Tensor, got {type(grads).__name__}")
    if grads.dim() != 2 or grads.shape[0] < 2:
        raise ValueError(f"grads: expected shape (n, n_params) with n >= 2, got {tuple(grads.shape)}")
    return grads


def gradient_statistics(grads: Tensor) -> GradientStatistics:
    """Summarize ``n`` independent gradient estimates, the rows of :func:`gradient_samples`.

    ``snr`` is :func:`signal_to_noise` of each parameter on its own,

    .. math::

        \\mathrm{SNR}_j = \\frac{|\\mathbb{E}[g_j]|}{\\sqrt{\\operatorname{Var}[g_j]}}
        \\approx \\frac{\\sqrt{\\max(0, \\bar g_j^2 - s_j^2 / n)}}{s_j}.

    Parameters
    ----------
    grads : Tensor, shape (n, n_params)
        One gradient estimate per row, ``n >= 2``.

    Returns
    -------
    GradientStatistics
        ``mean``, ``variance`` (unbiased) and ``snr``, each of shape ``(n_params,)``.

    References
    ----------
    Rainforth et al. (2018), "Tighter variational bounds are not necessarily better", eq. (6).
    """
    grads = _check_grads(grads)
    n = grads.shape[0]
    mean = grads.mean(dim=0)  # (n_params,)
    variance = grads.var(dim=0)  # (n_params,)
    r = torch.tensor(float(n), dtype=grads.dtype)
    snr = _snr(r, mean.pow(2), grads.pow(2).sum(dim=0))  # per parameter: a block of one
    return GradientStatistics(mean=mean, variance=variance, snr=snr, n=n)
