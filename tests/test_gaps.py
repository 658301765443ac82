"""The inference gap split: on a linear-Gaussian VAE the Gaussian family holds the posterior exactly."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import kl_divergence

import vaelib
from vaelib.gaps import inference_gaps, optimize_posterior
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
    """Approximation gap = KL(q*||p(z|x)) ~ 0; amortization gap = KL(q_phi||p(z|x)), both in closed form."""
    vae = vaelib.toy.linear_gaussian_vae(toy, mean_factor=0.6, scale_factor=1.5)
    gaps = inference_gaps(vae, x, k=2000, k_elbo=500, steps=300, seed=0)
    exact_log_px = toy.log_marginal(x)
    kl_enc = kl_divergence(as_multivariate_normal(vae.encode(x)), toy.posterior(x)).detach()  # (n,)
    q_opt = optimize_posterior(vae, x, steps=300, k=16, seed=0)  # the same fit: same seed
    kl_opt = kl_divergence(as_multivariate_normal(q_opt), toy.posterior(x))  # (n,)
    n = x.shape[0]
    # log p(x) by importance sampling from q*, which is nearly the posterior: close to exact.
    assert (gaps.log_px - exact_log_px).abs().max() < 0.01
    # The approximation gap is KL(q* || p(z|x)), tiny, and the estimate agrees with the closed form.
    diff = gaps.approximation_gap - kl_opt
    assert kl_opt.mean() < 0.005
    assert abs(diff.mean()) < 4 * diff.std() / n**0.5 + 1e-4
    # The amortization gap is the encoder's KL to the posterior (less the tiny KL of q*).
    diff = gaps.amortization_gap - (kl_enc - kl_opt)
    se = diff.std() / n**0.5
    assert kl_enc.mean() > 1.0
    assert abs(diff.mean()) < 4 * se
    # The parts add up to the gap measured with independent draws; a wrong sign would not.
    assert gaps.adds_up()


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
