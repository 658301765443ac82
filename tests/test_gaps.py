"""The inference gap split: on a linear-Gaussian VAE the Gaussian family holds the posterior exactly."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import kl_divergence

import vaelib
from vaelib.gaps import inference_gaps, log_marginal, optimize_posterior
from vaelib.toy import as_multivariate_normal


@pytest.fixture
def toy() -> vaelib.LinearGaussian:
    """One latent dimension, so the exact posterior is a diagonal Gaussian."""
    return vaelib.LinearGaussian.random(x_dim=3, z_dim=1, noise_std=0.5, seed=0)


@pytest.fixture
def x(toy: vaelib.LinearGaussian) -> torch.Tensor:
    data, _ = toy.sample(40, generator=torch.Generator().manual_seed(1))
    return data


def test_optimized_gaussian_recovers_the_exact_posterior(toy, x):
    """Started at a poor encoder, the per-point fit ends within 0.01 nats of p(z|x), by the closed-form KL."""
    vae = vaelib.toy.linear_gaussian_vae(toy, mean_factor=0.5, scale_factor=2.0)
    q = optimize_posterior(vae, x, steps=300, k=16, seed=0)
    kl_start = kl_divergence(as_multivariate_normal(vae.encode(x)), toy.posterior(x))
    kl_end = kl_divergence(as_multivariate_normal(q), toy.posterior(x))
    assert kl_start.mean() > 1.0
    assert kl_end.max() < 0.01


def test_gaps_on_the_linear_gaussian_model_match_closed_forms(toy, x):
    """Each term against the closed form: log p(x) exact, q* the exact optimum, both gaps their KLs."""
    vae = vaelib.toy.linear_gaussian_vae(toy, mean_factor=0.6, scale_factor=1.5)
    q_opt = optimize_posterior(vae, x, steps=300, k=16, seed=0)
    gaps = inference_gaps(vae, x, k=2000, k_elbo=500, posterior=q_opt, seed=0)
    exact_log_px = toy.log_marginal(x)
    kl_enc = kl_divergence(as_multivariate_normal(vae.encode(x)), toy.posterior(x)).detach()  # (n,)
    kl_opt = kl_divergence(as_multivariate_normal(q_opt), toy.posterior(x))  # (n,)
    n = x.shape[0]
    # log p(x) by importance sampling from q*, which is nearly the posterior: close to exact.
    assert (gaps.log_px - exact_log_px).abs().max() < 0.01
    # q* is within 0.005 nats of the exact optimum of the family, the posterior itself.
    assert kl_opt.max() < 0.005
    # The approximation gap is KL(q* || p(z|x)), and the estimate agrees with the closed form.
    diff = gaps.approximation_gap - kl_opt
    assert abs(diff.mean()) < 4 * diff.std() / n**0.5
    # The amortization gap is the encoder's KL to the posterior, less the tiny KL of q*.
    diff = gaps.amortization_gap - (kl_enc - kl_opt)
    assert kl_enc.mean() > 1.0
    assert abs(diff.mean()) < 4 * diff.std() / n**0.5
    # The inference gap is their sum, and the encoder's KL to the posterior.
    assert torch.allclose(gaps.inference_gap, gaps.approximation_gap + gaps.amortization_gap)
    diff = gaps.inference_gap - kl_enc
    assert abs(diff.mean()) < 4 * diff.std() / n**0.5


def test_the_fit_without_posterior_is_the_fit_given_as_posterior(toy, x):
    """inference_gaps fits q* by optimize_posterior with its seed; passing that fit gives the same numbers."""
    vae = vaelib.toy.linear_gaussian_vae(toy, mean_factor=0.6)
    fitted = inference_gaps(vae, x, k=100, k_elbo=50, steps=50, seed=2)
    given = inference_gaps(vae, x, k=100, k_elbo=50, posterior=optimize_posterior(vae, x, steps=50, seed=2), seed=2)
    for name in ("log_px", "elbo_amortized", "elbo_optimized"):
        assert torch.equal(getattr(fitted, name), getattr(given, name)), name


def test_a_fit_from_the_prior_reaches_the_same_optimum(toy, x):
    """Started at N(0, I) with another seed, the fit also ends on the exact posterior (closed-form KL)."""
    vae = vaelib.toy.linear_gaussian_vae(toy, mean_factor=0.5, scale_factor=2.0)
    q = optimize_posterior(vae, x, steps=300, seed=5, start="prior")
    kl = kl_divergence(as_multivariate_normal(q), toy.posterior(x))  # (n,)
    assert kl.mean() < 0.005 and kl.max() < 0.05


def test_log_marginal_against_the_exact_evidence(toy, x):
    """Exact with the posterior as proposal; with k = 1 the ELBO (gap KL, in closed form); many draws close the gap."""
    vae = vaelib.toy.linear_gaussian_vae(toy)
    exact = toy.log_marginal(x)
    assert torch.allclose(log_marginal(vae, x, vae.encode(x), 3, seed=0), exact, atol=1e-8)
    shifted = as_multivariate_normal(vaelib.toy.linear_gaussian_vae(toy, mean_factor=0.8).encode(x))
    kl = kl_divergence(shifted, toy.posterior(x))  # (n,)
    diff = exact - log_marginal(vae, x, shifted, 1, seed=1) - kl
    assert abs(diff.mean()) < 4 * diff.std() / x.shape[0] ** 0.5
    gap = exact - log_marginal(vae, x, shifted, 4000, seed=2, chunk=500)  # in eight chunks
    assert kl.mean() > 0.3 and abs(gap.mean()) < kl.mean() / 10


def test_exact_encoder_has_no_amortization_gap(toy, x):
    """With q_phi = p(z|x) every log weight equals log p(x): both gaps vanish."""
    vae = vaelib.toy.linear_gaussian_vae(toy)
    gaps = inference_gaps(vae, x, k=200, k_elbo=50, steps=50, lr=1e-3, seed=1)
    exact = toy.log_marginal(x)
    assert torch.allclose(gaps.elbo_amortized, exact, atol=1e-8)
    # q* can only wander off the exact posterior, by the optimizer's noise.
    assert gaps.amortization_gap.mean() <= 0
    assert gaps.amortization_gap.abs().max() < 0.02
    # Their sum is log p(x), importance-sampled from q* with 200 draws, less the exact ELBO.
    assert (gaps.approximation_gap + gaps.amortization_gap).abs().max() < 0.01


def test_optimize_posterior_leaves_the_model_and_random_state_alone(toy, x):
    """The model's weights, their requires_grad and the global generator are unchanged."""
    vae = vaelib.toy.linear_gaussian_vae(toy, mean_factor=0.5)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    state = torch.get_rng_state()
    optimize_posterior(vae, x, steps=5, seed=3)
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert all(p.requires_grad for p in vae.parameters())
    assert torch.equal(state, torch.get_rng_state())


def test_arguments_are_checked(toy, x):
    """Bad arguments raise before any work, naming the argument."""
    vae = vaelib.toy.linear_gaussian_vae(toy)
    with pytest.raises(ValueError, match="family"):
        optimize_posterior(vae, x, family="mixture")
    with pytest.raises(ValueError, match="family"):
        optimize_posterior(vae, x, family="flow")  # a plain VAE has no flow
    with pytest.raises(TypeError, match="model"):
        inference_gaps(object(), x)
    with pytest.raises(TypeError, match="x"):
        inference_gaps(vae, [[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="steps"):
        optimize_posterior(vae, x, steps=0)
    with pytest.raises(ValueError, match="start"):
        optimize_posterior(vae, x, start="zero")
    with pytest.raises(TypeError, match="posterior"):
        inference_gaps(vae, x, posterior=torch.zeros(40, 1))
    with pytest.raises(ValueError, match="posterior"):
        inference_gaps(vae, x, posterior=vae.encode(x[:3]))
    with pytest.raises(TypeError, match="q"):
        log_marginal(vae, x, torch.zeros(40, 1), 10)
    with pytest.raises(ValueError, match="k"):
        log_marginal(vae, x, vae.encode(x), 0)
