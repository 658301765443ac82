"""Lower bounds on log p(x) computed from log importance weights.

Every bound in the book is a function of the log importance weights

.. math::

    \\log w_i = \\log p(x, z_i) - \\log q(z_i \\mid x), \\qquad z_i \\sim q(z \\mid x),

stacked with the particle index first: ``log_w`` has shape ``(k, batch)``.
The book derives both bounds in the chapters "Road 1" (ELBO) and
"The importance weighted autoencoder" (IWAE).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import Distribution

from vaelib._checks import check_log_weights, check_nonnegative_int, check_positive_int

__all__ = ["elbo_from_log_weights", "iwae_from_log_weights", "log_weights"]


def elbo_from_log_weights(log_w: Tensor) -> Tensor:
    """Monte Carlo estimate of the ELBO: the mean of the log weights.

    .. math::

        \\hat{\\mathcal{L}}_k(x) = \\frac{1}{k} \\sum_{i=1}^k \\log w_i

    is an unbiased estimate of
    :math:`\\mathcal{L}(x) = \\mathbb{E}_{q}[\\log p(x, z) - \\log q(z \\mid x)]`.

    Parameters
    ----------
    log_w : Tensor, shape (k, batch)
        Log importance weights, particles on the leading dimension.

    Returns
    -------
    Tensor, shape (batch,)
        The ELBO estimate for each data point.

    References
    ----------
    Kingma and Welling (2013), "Auto-Encoding Variational Bayes", eq. (3).
    """
    check_log_weights(log_w)
    return log_w.mean(dim=0)


def iwae_from_log_weights(log_w: Tensor) -> Tensor:
    """The importance weighted bound: log of the mean of the weights.

    .. math::

        \\mathcal{L}_k(x) = \\log \\frac{1}{k} \\sum_{i=1}^k w_i
        = \\operatorname{logsumexp}_i(\\log w_i) - \\log k .

    Its expectation is a lower bound on :math:`\\log p(x)` that rises with
    ``k`` and equals the ELBO at ``k = 1``. ``logsumexp`` keeps it finite even
    when the log weights span thousands of nats.

    Parameters
    ----------
    log_w : Tensor, shape (k, batch)
        Log importance weights, particles on the leading dimension.

    Returns
    -------
    Tensor, shape (batch,)
        The bound for each data point.

    References
    ----------
    Burda, Grosse and Salakhutdinov (2015), "Importance Weighted
    Autoencoders", eq. (8).
    """
    check_log_weights(log_w)
    k = log_w.shape[0]
    return torch.logsumexp(log_w, dim=0) - math.log(k)


def log_weights(
    x: Tensor,
    q: Distribution,
    log_joint: Callable[[Tensor, Tensor], Tensor],
    k: int = 1,
    *,
    seed: int | None = None,
) -> Tensor:
    """Draw ``k`` reparameterized samples from ``q`` and return their log weights.

    .. math::

        z_i = g(\\epsilon_i, x), \\quad \\epsilon_i \\sim p(\\epsilon), \\qquad
        \\log w_i = \\log p(x, z_i) - \\log q(z_i \\mid x)

    Parameters
    ----------
    x : Tensor, shape (batch, x_dim)
        Data.
    q : Distribution
        Approximate posterior with batch shape ``(batch,)`` and event shape
        ``(z_dim,)``; it must support ``rsample`` so gradients flow through
        the samples (the reparameterization trick).
    log_joint : callable
        ``log_joint(x, z)`` returns :math:`\\log p(x, z)` of shape ``(k, batch)``
        for ``z`` of shape ``(k, batch, z_dim)``.
    k : int
        Number of importance samples.
    seed : int, optional
        Draw the samples from a generator seeded with ``seed`` (the caller's
        random state is left untouched); by default from the global generator.

    Returns
    -------
    Tensor, shape (k, batch)

    References
    ----------
    Kingma and Welling (2013), section 2.4 (the reparameterization trick).
    """
    check_positive_int(k, "k")
    if seed is None:
        z = q.rsample((k,))  # (k, batch, z_dim)
    else:
        check_nonnegative_int(seed, "seed")
        cuda = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            z = q.rsample((k,))  # (k, batch, z_dim)
    return log_joint(x, z) - q.log_prob(z)  # (k, batch)
