"""Rate and distortion: the two terms of the ELBO, the beta objective, free bits and KL warm-up.

The negative ELBO splits into a *distortion* and a *rate*,

.. math::

    -\\mathcal{L}(x) = D(x) + R(x), \\qquad
    D(x) = -\\mathbb{E}_{q_\\phi(z \\mid x)}\\big[\\log p_\\theta(x \\mid z)\\big], \\qquad
    R(x) = \\mathrm{KL}\\big(q_\\phi(z \\mid x) \\,\\Vert\\, p(z)\\big),

and averaged over the data they are the two axes of the rate-distortion plane of
Alemi et al. (2018), in which every model with the same ELBO lies on the line
:math:`R + D = \\text{const}`. The book's chapter "Posterior collapse and the
rate-distortion view" traces that plane with beta-VAEs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, kl_divergence

from vaelib._checks import check_nonnegative_int, check_positive_int, check_seed
from vaelib._stats import mean_se
from vaelib.protocols import EncoderDecoder

__all__ = [
    "RateDistortion",
    "beta_elbo",
    "check_weight",
    "kl_warmup",
    "rate_distortion",
]

LN2 = math.log(2.0)


def _check_model(vae: object) -> None:
    if not all(hasattr(vae, name) for name in ("encode", "decode", "prior")):
        raise TypeError(f"vae: expected a model with encode, decode and prior (a vaelib.VAE), got {type(vae).__name__}")


def check_weight(value: object, name: str) -> float:
    """A weight such as beta or free bits as a finite float >= 0, or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"{name}: expected a finite number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
    return float(value)


def _draw(q: Distribution, k: int, seed: int | None, device: torch.device) -> Tensor:
    """``k`` reparameterized draws from ``q``, from a generator seeded with ``seed`` if given."""
    if seed is None:
        return q.rsample((k,))  # (k, batch, z_dim)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return q.rsample((k,))  # (k, batch, z_dim)


def _terms(vae: EncoderDecoder, x: Tensor, k: int, analytic_kl: bool | None, seed: int | None) -> tuple[Tensor, Tensor]:
    """Distortion ``(batch,)`` and rate per latent group ``(batch, groups)`` from the same ``k`` draws.

    The groups are the latent dimensions when ``q`` and the prior are ``Independent``
    (the diagonal Gaussian of :class:`~vaelib.models.VAE`), else one group holding all of ``z``.
    The rate is the closed-form KL where torch registers one (``analytic_kl=None`` or ``True``),
    else the Monte Carlo average of :math:`\\log q(z \\mid x) - \\log p(z)` over the draws.
    """
    q, prior = vae.encode(x), vae.prior
    z = _draw(q, k, seed, x.device)  # (k, batch, z_dim)
    distortion = -vae.decode(z).log_prob(x).mean(dim=0)  # (batch,)
    q_parts, p_parts = q, prior
    split = False
    if isinstance(q, Independent) and isinstance(prior, Independent) and q.reinterpreted_batch_ndims == 1:
        q_parts, p_parts, split = q.base_dist, prior.base_dist, True
    if analytic_kl is not False:
        try:
            rate = kl_divergence(q_parts, p_parts)  # (batch, z_dim) or (batch,)
        except NotImplementedError:
            if analytic_kl:
                raise ValueError(
                    f"analytic_kl: torch has no closed-form KL for {type(q_parts).__name__} "
                    f"to {type(p_parts).__name__}; use analytic_kl=False (Monte Carlo)"
                ) from None
        else:
            return distortion, rate if split else rate.unsqueeze(-1)
    rate = (q_parts.log_prob(z) - p_parts.log_prob(z)).mean(dim=0)  # (batch, z_dim) or (batch,)
    return distortion, rate if split else rate.unsqueeze(-1)


@dataclass(frozen=True)
class RateDistortion:
    """Rate and distortion per data point, in nats or bits (``unit``).

    ``rate + distortion`` is minus the ELBO; ``elbo`` returns it with its sign.
    ``mean()`` gives the averages over the data with their standard errors.
    """

    rate: Tensor  # (batch,)
    distortion: Tensor  # (batch,)
    unit: str = "nats"

    @property
    def elbo(self) -> Tensor:
        """:math:`\\mathcal{L}(x) = -(D(x) + R(x))`, shape (batch,)."""
        return -(self.distortion + self.rate)

    def to_bits(self) -> RateDistortion:
        """The same terms divided by :math:`\\ln 2`: code lengths in bits (see :func:`rate_distortion`)."""
        if self.unit == "bits":
            return self
        return RateDistortion(self.rate / LN2, self.distortion / LN2, "bits")

    def mean(self) -> dict[str, float]:
        """Means over the data points and their standard errors: keys rate, rate_se, distortion, distortion_se."""
        out = {}
        for name, values in (("rate", self.rate), ("distortion", self.distortion)):
            out[name], out[f"{name}_se"] = mean_se(values)
        return out


def rate_distortion(
    vae: EncoderDecoder,
    x: Tensor,
    k: int = 1,
    *,
    seed: int | None = None,
    analytic_kl: bool | None = None,
    bits: bool = False,
) -> RateDistortion:
    """The rate :math:`R(x)` and distortion :math:`D(x)` of each data point.

    .. math::

        D(x) \\approx -\\frac{1}{k}\\sum_{i=1}^k \\log p_\\theta(x \\mid z_i), \\qquad
        R(x) = \\mathrm{KL}\\big(q_\\phi(z \\mid x) \\,\\Vert\\, p(z)\\big)
        \\ \\text{or}\\ \\frac{1}{k}\\sum_{i=1}^k \\big[\\log q_\\phi(z_i \\mid x) - \\log p(z_i)\\big],
        \\qquad z_i \\sim q_\\phi(z \\mid x),

    so that :math:`R + D = -\\mathcal{L}(x)`. In bits, :math:`R / \\ln 2` is the
    expected net cost of sending :math:`z` with bits-back coding and
    :math:`D / \\ln 2` that of sending :math:`x` given :math:`z`.

    Parameters
    ----------
    vae : VAE
        Any model with ``encode``, ``decode`` and ``prior`` (a flow posterior works:
        its rate is then estimated by Monte Carlo).
    x : Tensor, shape ``(batch, *x_shape)``
    k : int
        Draws of :math:`z` per data point for the distortion (and a Monte Carlo rate).
    seed : int, optional
        Draw from a generator seeded with ``seed``; the caller's random state is untouched.
    analytic_kl : bool, optional
        ``None`` (default): the closed-form KL where torch has one, else Monte Carlo;
        ``True``: closed form or ``ValueError``; ``False``: Monte Carlo from the same draws.
    bits : bool
        Return the terms in bits instead of nats.

    Returns
    -------
    RateDistortion
        ``rate`` and ``distortion`` of shape (batch,); gradients flow unless the
        caller wraps the call in ``torch.no_grad()``.

    References
    ----------
    Alemi et al. (2018), "Fixing a Broken ELBO", section 2 (eq. 6);
    Kingma and Welling (2013), appendix B (the closed-form KL).
    """
    _check_model(vae)
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    k = check_positive_int(k, "k")
    if seed is not None:
        seed = check_seed(seed, "seed")
    if analytic_kl is not None and not isinstance(analytic_kl, bool):
        raise TypeError(f"analytic_kl: expected None, True or False, got {analytic_kl!r}")
    if not isinstance(bits, bool):
        raise TypeError(f"bits: expected True or False, got {bits!r}")
    distortion, rate = _terms(vae, x, k, analytic_kl, seed)
    out = RateDistortion(rate.sum(dim=-1), distortion)  # (batch,) each
    return out.to_bits() if bits else out


def beta_elbo(
    vae: EncoderDecoder,
    x: Tensor,
    beta: float = 1.0,
    *,
    k: int = 1,
    analytic_kl: bool | None = None,
    free_bits: float = 0.0,
) -> Tensor:
    """The beta objective :math:`-(D + \\beta R)` per data point, with free bits; shape (batch,).

    With free bits :math:`\\lambda` the rate of each latent dimension :math:`j` is replaced,
    over the minibatch, by :math:`\\max(\\lambda, \\overline{\\mathrm{KL}}_j)`, where
    :math:`\\overline{\\mathrm{KL}}_j` is its average over the batch:

    .. math::

        \\frac{1}{B}\\sum_{b=1}^B \\Big[-D(x_b) - \\beta \\sum_j r_{bj}\\Big]
        = -\\bar D - \\beta \\sum_{j} \\max\\big(\\lambda, \\overline{\\mathrm{KL}}_j\\big),
        \\qquad r_{bj} = \\begin{cases} \\mathrm{KL}_{bj} & \\overline{\\mathrm{KL}}_j > \\lambda \\\\
        \\lambda & \\text{otherwise,} \\end{cases}

    so a dimension whose average KL is below :math:`\\lambda` gets no gradient from the rate.
    With ``beta=1`` and ``free_bits=0`` this is the ELBO. A model whose ``q`` is not
    ``Independent`` over dimensions has one group, all of :math:`z`.

    References
    ----------
    Higgins et al. (2017), "beta-VAE"; Alemi et al. (2018), "Fixing a Broken ELBO";
    Kingma et al. (2016), "Improved Variational Inference with Inverse Autoregressive
    Flow", appendix C (free bits).
    """
    _check_model(vae)
    beta = check_weight(beta, "beta")
    free_bits = check_weight(free_bits, "free_bits")
    k = check_positive_int(k, "k")
    distortion, rate = _terms(vae, x, k, analytic_kl, None)  # (batch,), (batch, groups)
    if free_bits > 0:
        below = rate.detach().mean(dim=0) <= free_bits  # (groups,)
        rate = torch.where(below, torch.full_like(rate, free_bits), rate)  # (batch, groups)
    return -(distortion + beta * rate.sum(dim=-1))


def kl_warmup(epochs: int, beta: float = 1.0) -> Callable[[int], float]:
    """The linear KL warm-up: the weight of the rate in epoch ``e`` (from 1), stepped once per epoch.

    .. math::

        \\beta_e = \\beta \\min\\Big(1, \\frac{e - 1}{E_{\\text{warm}}}\\Big),

    0 in the first epoch, rising linearly to ``beta`` in epoch ``epochs + 1`` and
    held there; ``epochs=0`` is ``beta`` throughout.

    References
    ----------
    Bowman et al. (2016), "Generating Sentences from a Continuous Space", section 3.1;
    Sønderby et al. (2016), "Ladder Variational Autoencoders".
    """
    epochs = check_nonnegative_int(epochs, "kl_warmup_epochs")
    beta = check_weight(beta, "beta")

    def weight(epoch: int) -> float:
        return beta if epochs == 0 else beta * min(1.0, (epoch - 1) / epochs)

    return weight
