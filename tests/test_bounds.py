"""The ELBO and IWAE estimators from log weights: exact, Monte Carlo and extreme-value checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vaelib
from tests.conftest import gaussian_q


def test_elbo_and_iwae_from_known_weights():
    """Mean and log-mean-exp of hand-picked log weights."""
    log_w = torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))  # (k=2, batch=2)
    torch.testing.assert_close(vaelib.elbo_from_log_weights(log_w), log_w.mean(0))
    torch.testing.assert_close(
        vaelib.iwae_from_log_weights(log_w), torch.tensor([math.log(2.0), math.log(3.0)], dtype=torch.float64)
    )


def test_iwae_with_one_sample_is_the_elbo():
    """At k = 1 both estimators are the single log weight."""
    log_w = torch.randn(1, 6)
    torch.testing.assert_close(vaelib.iwae_from_log_weights(log_w), vaelib.elbo_from_log_weights(log_w))


def test_iwae_is_at_least_the_elbo_pointwise():
    """log of a mean >= mean of logs for every draw (Jensen), so the IWAE estimate dominates."""
    log_w = 3 * torch.randn(20, 100)
    assert bool((vaelib.iwae_from_log_weights(log_w) >= vaelib.elbo_from_log_weights(log_w) - 1e-6).all())


def test_monte_carlo_elbo_matches_analytic(toy, toy_data):
    """The mean of elbo_from_log_weights matches the closed-form ELBO within 4 standard errors."""
    q = gaussian_q(toy_data.shape[0], toy.z_dim, seed=11)
    log_w = vaelib.log_weights(toy_data, q, toy.log_joint, k=20_000)  # (k, batch)
    se = log_w.std(0) / log_w.shape[0] ** 0.5
    gap = (vaelib.elbo_from_log_weights(log_w) - toy.elbo(toy_data, q)).abs()
    assert bool((gap < 4 * se).all()), (gap, se)


def test_iwae_rises_with_k_and_approaches_log_marginal(toy, toy_data):
    """E[L_1] < E[L_10] < E[L_100] <= log p(x), each mean within its standard error budget."""
    q = gaussian_q(toy_data.shape[0], toy.z_dim, seed=12)
    reps = 400
    means, ses = [], []
    for k in (1, 10, 100):
        log_w = vaelib.log_weights(toy_data, q, toy.log_joint, k=k * reps).reshape(reps, k, -1)
        bounds = torch.stack([vaelib.iwae_from_log_weights(lw) for lw in log_w])  # (reps, batch)
        means.append(bounds.mean(0))
        ses.append(bounds.std(0) / reps**0.5)
    log_px = toy.log_marginal(toy_data)
    for i in range(len(means) - 1):
        diff_se = (ses[i] ** 2 + ses[i + 1] ** 2).sqrt()
        assert bool((means[i + 1] - means[i] > 4 * diff_se).all()), "the bound did not rise clearly with k"
    assert bool((means[-1] <= log_px + 4 * ses[-1]).all())
    # The gap to log p(x) shrinks: L_100 is much closer than L_1.
    assert bool(((log_px - means[-1]) < 0.5 * (log_px - means[0])).all())


def test_log_weights_shape_and_gradient(toy, toy_data):
    """log_weights returns (k, batch) and is differentiable through the reparameterized samples."""
    loc = torch.zeros(toy_data.shape[0], toy.z_dim, dtype=torch.float64, requires_grad=True)
    q = torch.distributions.Independent(torch.distributions.Normal(loc, 1.0), 1)
    log_w = vaelib.log_weights(toy_data, q, toy.log_joint, k=7)
    assert log_w.shape == (7, toy_data.shape[0])
    log_w.sum().backward()
    assert loc.grad is not None and bool(torch.isfinite(loc.grad).all())


def test_bad_k_and_bad_log_weights(toy, toy_data):
    """k < 1 and empty or non-tensor log weights are refused with a clear message."""
    q = gaussian_q(toy_data.shape[0], toy.z_dim, seed=0)
    with pytest.raises(ValueError, match="k: expected an integer >= 1, got 0"):
        vaelib.log_weights(toy_data, q, toy.log_joint, k=0)
    with pytest.raises(TypeError, match="k"):
        vaelib.log_weights(toy_data, q, toy.log_joint, k=2.5)
    with pytest.raises(ValueError, match="log_w"):
        vaelib.iwae_from_log_weights(torch.empty(0, 3))
    with pytest.raises(TypeError, match="log_w"):
        vaelib.elbo_from_log_weights([[0.0]])


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(min_value=1, max_value=5000),
    spread=st.floats(min_value=1.0, max_value=900.0),
    offset=st.floats(min_value=-3000.0, max_value=3000.0),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_estimators_stay_finite_on_extreme_log_weights(k, spread, offset, seed):
    """Log weights spread over hundreds of nats, far from zero, give finite bounds in float32 (k up to 5000)."""
    g = torch.Generator().manual_seed(seed)
    log_w = (offset + spread * torch.randn(k, 3, generator=g)).float()  # (k, batch)
    iwae = vaelib.iwae_from_log_weights(log_w)
    elbo = vaelib.elbo_from_log_weights(log_w)
    assert bool(torch.isfinite(iwae).all()) and bool(torch.isfinite(elbo).all())
    # Sandwich: mean <= log-mean-exp <= max (float32 rounding allowance).
    tol = 1e-3 * (abs(offset) + spread)
    assert bool((iwae >= elbo - tol).all())
    assert bool((iwae <= log_w.max(0).values + tol).all())
    reference = torch.logsumexp(log_w.double(), 0) - math.log(k)
    torch.testing.assert_close(iwae.double(), reference, rtol=1e-5, atol=tol)


def _reference_bounds(log_w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """log-mean-exp and mean in float64 NumPy, with the max shifted out by hand."""
    w = log_w.double().numpy()
    top = w.max(axis=0)
    iwae = top + np.log(np.exp(w - top).sum(axis=0)) - math.log(w.shape[0])
    return iwae, w.mean(axis=0)


@pytest.mark.parametrize("k", [1, 2, 50, 5000])
def test_bounds_of_log_weights_spread_over_thousands_of_nats(k):
    """float32 log weights from -5000 to +3000 nats (one column all far below, one far above):
    finite bounds that agree with a float64 reference to float32 rounding."""
    g = torch.Generator().manual_seed(k)
    spread = -5000 + 8000 * torch.rand(k, 3, generator=g)
    low = torch.full((k, 1), -4000.0) - 300 * torch.rand(k, 1, generator=g)
    high = torch.full((k, 1), 3000.0) + 50 * torch.rand(k, 1, generator=g)
    log_w = torch.cat([spread, low, high], dim=1).float()  # (k, 5)
    if k > 1:
        log_w[0, 0] = -math.inf  # a zero weight among others is allowed
    iwae, elbo = vaelib.iwae_from_log_weights(log_w), vaelib.elbo_from_log_weights(log_w[:, 1:])
    assert iwae.dtype == torch.float32 and torch.isfinite(iwae).all() and torch.isfinite(elbo).all()
    ref_iwae, ref_elbo = _reference_bounds(log_w)
    eps = torch.finfo(torch.float32).eps
    scale = float(log_w[torch.isfinite(log_w)].abs().max())
    assert np.allclose(iwae.double().numpy(), ref_iwae, rtol=0, atol=8 * eps * scale)
    assert np.allclose(elbo.double().numpy(), ref_elbo[1:], rtol=0, atol=8 * eps * scale)
    assert (iwae.double().numpy() >= ref_elbo - 8 * eps * scale)[1:].all()  # Jensen: IWAE >= ELBO
