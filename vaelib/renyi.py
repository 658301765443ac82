"""The variational Renyi bound: one family from the IWAE bound (alpha = 0) to the ELBO (alpha -> 1).

For :math:`\\alpha \\in [0, 1)` and log weights :math:`\\log w_i` of ``k`` draws from ``q``,

.. math::

    \\hat{\\mathcal{L}}^{(\\alpha)}_k(x) = \\frac{1}{1 - \\alpha}
    \\log \\frac{1}{k} \\sum_{i=1}^k w_i^{1 - \\alpha},

the Monte Carlo estimate of
:math:`\\frac{1}{1-\\alpha}\\log \\mathbb{E}_q[w^{1-\\alpha}] = \\log p(x) - D_\\alpha(q \\,\\|\\, p(z \\mid x))`
(Li and Turner 2016, eqs. 4 and 8). For the same draws it is the log of the power mean of order
:math:`1 - \\alpha` of the weights, so it never increases with :math:`\\alpha`; at :math:`\\alpha = 0` it is
the IWAE bound and as :math:`\\alpha \\to 1` it tends to the mean of the log weights (the ELBO estimate).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vaelib._checks import check_log_weights

__all__ = ["SMALL_ONE_MINUS_ALPHA", "check_alpha", "renyi_from_log_weights"]

# Below this 1 - alpha the log1p/expm1 form keeps the digits that logsumexp - log k would cancel.
SMALL_ONE_MINUS_ALPHA = 1e-3


def check_alpha(alpha: object) -> float:
    """``alpha`` as a float in [0, 1), or a ``TypeError`` / ``ValueError`` naming it."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha: expected a float in [0, 1), got {type(alpha).__name__}")
    if not 0.0 <= float(alpha) < 1.0:
        raise ValueError(f"alpha: expected a float in [0, 1), got {alpha}")
    return float(alpha)


def renyi_from_log_weights(log_w: Tensor, alpha: float) -> Tensor:
    """The variational Renyi bound estimate from log importance weights.

    .. math::

        \\hat{\\mathcal{L}}^{(\\alpha)}_k(x) = \\frac{1}{1 - \\alpha}
        \\Big(\\operatorname{logsumexp}_i\\big((1 - \\alpha) \\log w_i\\big) - \\log k\\Big)

    Parameters
    ----------
    log_w : Tensor, shape (k, batch)
        Log importance weights, particles on the leading dimension.
    alpha : float
        Order in [0, 1): 0 gives the IWAE bound, values near 1 the ELBO.

    Returns
    -------
    Tensor, shape (batch,)

    References
    ----------
    Li and Turner (2016), "Renyi divergence variational inference", eq. (8).
    """
    check_log_weights(log_w)
    alpha = check_alpha(alpha)
    s = 1.0 - alpha
    k = log_w.shape[0]
    if s >= SMALL_ONE_MINUS_ALPHA:
        return (torch.logsumexp(s * log_w, dim=0) - math.log(k)) / s
    # log mean exp(s log w) = m + log1p(mean(expm1(s (log w - m)))) for m = mean(log w): each
    # s (log w - m) is small, so nothing of size log k is subtracted.
    m = log_w.mean(dim=0)  # (batch,)
    return m + torch.log1p(torch.expm1(s * (log_w - m)).mean(dim=0)) / s
