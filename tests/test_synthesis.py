"""vaelib.book.synthesis: the frames of the synthesis chapter's figure, and its Monte Carlo helpers."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch
from torch.distributions import Independent, Normal

import vaelib
from vaelib.book.synthesis import gap_frames

matplotlib.use("Agg")


def test_exact_terms_agree_with_the_hand_derived_gaussian_gap(gap_setup):
    """log p(x) - ELBO = KL(q || p(z|x)) = -log r + (r^2 + delta^2)/2 - 1/2, in every frame."""
    toy, x, frames = gap_setup
    d, r = frames.shifts[:, None], frames.widths[None, :]
    formula = -r.log() + (r**2 + d**2) / 2 - 0.5
    assert torch.allclose(frames.log_px - frames.elbo, formula, atol=1e-10)
    assert torch.allclose(frames.kl_posterior, formula, atol=1e-10)
    assert frames.log_px == pytest.approx(float(toy.log_marginal(x)[0]), abs=1e-12)


def test_kl_to_the_prior_matches_monte_carlo(gap_setup):
    """KL(q || p(z)) of a frame against the mean of log q - log p(z) over draws of q."""
    toy, _, frames = gap_setup
    q = Independent(Normal(frames.loc[2, 2].reshape(1), frames.scale[2, 2].reshape(1)), 1)
    torch.manual_seed(2)
    z = q.sample((200_000,))  # (200000, 1, 1)
    diff = q.log_prob(z) - toy.prior.log_prob(z)
    se = diff.std() / math.sqrt(len(diff))
    assert abs(diff.mean() - frames.kl_prior[2, 2]) < 4 * se


def test_bounds_at_the_posterior_are_exact(gap_setup):
    """With q = p(z | x) (shift 0, width 1) every weight is p(x), so every L_k is log p(x)."""
    _, _, frames = gap_setup
    assert torch.allclose(frames.iwae[:, 1, 1], torch.full((2,), frames.log_px, dtype=torch.float64), atol=1e-10)
    assert float(frames.iwae_se[:, 1, 1].max()) < 1e-10


def test_bounds_match_independent_estimates_and_rise_with_k(gap_setup):
    """A frame's L_k agrees with estimates from vaelib.log_weights; ELBO < L_4 < L_64 <= log p(x)."""
    toy, x, frames = gap_setup
    torch.manual_seed(3)
    q = Independent(Normal(frames.loc[2, 2].reshape(1, 1), frames.scale[2, 2].reshape(1, 1)), 1)
    for n, k in enumerate(frames.ks):
        reps = 20_000 // k
        est = vaelib.iwae_from_log_weights(vaelib.log_weights(x.expand(reps, -1), q.expand((reps,)), toy.log_joint, k))
        se = math.hypot(est.std() / math.sqrt(reps), frames.iwae_se[n, 2, 2])
        assert abs(est.mean() - frames.iwae[n, 2, 2]) < 4 * se
    L4, L64 = frames.iwae[:, 2, 2]
    se4, se64 = frames.iwae_se[:, 2, 2]
    assert L4 - frames.elbo[2, 2] > 4 * se4
    assert L64 - L4 > 4 * math.hypot(se4, se64)
    assert L64 <= frames.log_px + 4 * se64


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"toy": "model"}, TypeError, "toy"),
        ({"toy": vaelib.LinearGaussian.random(x_dim=2, z_dim=2)}, ValueError, "toy"),
        ({"x": torch.zeros(2, 2, dtype=torch.float64)}, ValueError, "x"),
        ({"shifts": [0.0]}, TypeError, "shifts"),
        ({"widths": torch.tensor([1.0, 0.0])}, ValueError, "widths"),
        ({"ks": (0,)}, ValueError, "ks"),
        ({"draws": 3}, ValueError, "draws"),
    ],
)
def test_argument_errors(gap_setup, change, error, match):
    """Bad arguments raise before any work, naming the argument."""
    toy, x, _ = gap_setup
    kwargs = {"toy": toy, "x": x, "shifts": torch.zeros(2), "widths": torch.ones(2), "ks": (2,), "draws": 100}
    kwargs.update(change)
    with pytest.raises(error, match=match):
        gap_frames(**kwargs)


def test_jensen_gap_is_the_kl_to_the_posterior(gap_setup):
    """The Monte Carlo Jensen gap meets the closed-form KL(q || p(z|x)) within 4 standard errors."""
    toy, x, _ = gap_setup
    torch.manual_seed(4)
    posterior = toy.posterior(x)
    q = Independent(Normal(posterior.mean + 0.3, 1.4 * posterior.stddev), 1)
    gap, se = vaelib.book.synthesis.jensen_gap(x, q, toy.log_joint, n=100_000)
    exact = toy.log_marginal(x) - toy.elbo(x, q)
    assert gap.shape == (1,) and se.shape == (1,)
    assert gap > 4 * se and abs(gap - exact) < 4 * se


def test_bound_estimate_at_k_1_is_the_elbo_and_rises_with_k(gap_setup):
    """L_1 meets the exact ELBO; L_20 is above it and below log p(x)."""
    toy, x, _ = gap_setup
    torch.manual_seed(5)
    posterior = toy.posterior(x)
    q = Independent(Normal(posterior.mean - 0.4, 1.2 * posterior.stddev), 1)
    L1, se1 = vaelib.book.synthesis.bound_estimate(x, q, toy.log_joint, 1, draws=50_000)
    L20, se20 = vaelib.book.synthesis.bound_estimate(x, q, toy.log_joint, 20, draws=50_000)
    assert abs(L1 - toy.elbo(x, q)[0]) < 4 * se1
    assert L20 - L1 > 4 * math.hypot(se1, se20)
    assert L20 < toy.log_marginal(x)[0] + 4 * se20


def test_monte_carlo_helpers_argument_errors(gap_setup):
    toy, x, _ = gap_setup
    q = toy.posterior(x)
    with pytest.raises(ValueError, match="n"):
        vaelib.book.synthesis.jensen_gap(x, q, toy.log_joint, n=1)
    with pytest.raises(ValueError, match="draws"):
        vaelib.book.synthesis.bound_estimate(x, q, toy.log_joint, 10, draws=15)
    with pytest.raises(ValueError, match="x"):
        vaelib.book.synthesis.bound_estimate(x.expand(2, -1), q, toy.log_joint, 1, draws=10)
