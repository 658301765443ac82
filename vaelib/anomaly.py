"""Scoring anomalies by likelihood: the ROC curve and its area.

A model of normal data flags ``x`` as anomalous when a score such as
:math:`-\\log p_\\theta(x)` is high. The area under the ROC curve is the
probability that a random anomaly scores above a random normal point,

.. math::

    \\mathrm{AUC} = P(s_a > s_n) + \\tfrac12 P(s_a = s_n),

with the standard error of Hanley and McNeil (1982). The chapter
"Applications" uses it for anomaly detection.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["roc_auc", "roc_curve"]


def _check_scores(s_normal: Tensor, s_anomalous: Tensor) -> tuple[Tensor, Tensor]:
    for name, s in (("s_normal", s_normal), ("s_anomalous", s_anomalous)):
        if not isinstance(s, Tensor) or s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"{name}: expected a non-empty 1-d tensor of scores, got {getattr(s, 'shape', s)!r}")
    return s_normal.detach().double().cpu(), s_anomalous.detach().double().cpu()


def roc_curve(s_normal: Tensor, s_anomalous: Tensor) -> tuple[Tensor, Tensor]:
    """False and true positive rates as the threshold sweeps down through the scores.

    Returns
    -------
    fpr, tpr : Tensor
        One entry more than there are scores in all; both start at 0 and end at 1.
    """
    s_normal, s_anomalous = _check_scores(s_normal, s_anomalous)
    order = torch.cat([s_normal, s_anomalous]).argsort(descending=True)
    hit = torch.cat([torch.zeros_like(s_normal), torch.ones_like(s_anomalous)])[order]  # 1 = anomaly
    zero = torch.zeros(1, dtype=hit.dtype)
    fpr = torch.cat([zero, (1 - hit).cumsum(0) / s_normal.numel()])
    tpr = torch.cat([zero, hit.cumsum(0) / s_anomalous.numel()])
    return fpr, tpr


def roc_auc(s_normal: Tensor, s_anomalous: Tensor) -> tuple[float, float]:
    """Area under the ROC curve and its standard error.

    .. math::

        \\mathrm{SE}^2 = \\frac{A(1-A) + (n_a - 1)(Q_1 - A^2) + (n_n - 1)(Q_2 - A^2)}{n_a n_n},
        \\quad Q_1 = \\frac{A}{2 - A}, \\quad Q_2 = \\frac{2A^2}{1 + A}.

    Returns
    -------
    auc, se : float

    References
    ----------
    Hanley and McNeil (1982), "The meaning and use of the area under a receiver
    operating characteristic (ROC) curve", Radiology 143(1).
    """
    s_normal, s_anomalous = _check_scores(s_normal, s_anomalous)
    # Mann-Whitney: pairs in the right order count 1, ties one half.
    auc = float((torch.sign(s_anomalous[:, None] - s_normal[None, :]) + 1).mean() / 2)
    n_a, n_n = s_anomalous.numel(), s_normal.numel()
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_a - 1) * (q1 - auc**2) + (n_n - 1) * (q2 - auc**2)) / (n_a * n_n)
    return auc, math.sqrt(max(var, 0.0))
