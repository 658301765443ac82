"""ROC curve and AUC: exact on small cases, Monte Carlo against a known probability."""

from __future__ import annotations

import math

import pytest
import torch

from vaelib.anomaly import roc_auc, roc_curve


def test_auc_of_perfect_random_and_reversed_scores():
    """Separated scores give 1, reversed give 0, identical give one half (ties count half)."""
    normal, anomalous = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 4.0])
    assert roc_auc(normal, anomalous)[0] == 1.0
    assert roc_auc(anomalous, normal)[0] == 0.0
    assert roc_auc(torch.ones(4), torch.ones(3))[0] == 0.5


def test_auc_counts_ordered_pairs():
    """AUC is the fraction of (anomaly, normal) pairs in the right order: 5 of 6 here."""
    assert roc_auc(torch.tensor([0.0, 2.5, 1.0]), torch.tensor([2.0, 3.0]))[0] == pytest.approx(5 / 6)


def test_auc_matches_the_gaussian_probability_within_its_standard_error():
    """For N(0,1) normal and N(1,1) anomalous scores, AUC = Phi(1/sqrt 2) within 4 Hanley-McNeil SEs."""
    g = torch.Generator().manual_seed(0)
    normal, anomalous = torch.randn(800, generator=g), 1 + torch.randn(600, generator=g)
    auc, se = roc_auc(normal, anomalous)
    exact = 0.5 * (1 + math.erf(0.5))  # Phi(1 / sqrt(2))
    assert abs(auc - exact) < 4 * se and 0 < se < 0.05


def test_roc_curve_area_equals_auc():
    """The trapezoid area under (fpr, tpr) equals the pair-counting AUC when there are no ties."""
    g = torch.Generator().manual_seed(1)
    normal, anomalous = torch.randn(50, generator=g), 0.7 + torch.randn(40, generator=g)
    fpr, tpr = roc_curve(normal, anomalous)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert float(torch.trapezoid(tpr, fpr)) == pytest.approx(roc_auc(normal, anomalous)[0], abs=1e-12)


def test_bad_scores():
    """Empty or 2-d scores are refused with the argument's name."""
    with pytest.raises(ValueError, match="s_normal"):
        roc_auc(torch.empty(0), torch.ones(2))
    with pytest.raises(ValueError, match="s_anomalous"):
        roc_curve(torch.ones(2), torch.ones(2, 2))
