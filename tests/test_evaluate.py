"""Importance-sampled log-likelihood and active units, checked against the exact linear-Gaussian model."""

from __future__ import annotations

import pytest
import torch

import vaelib


def vae_from_toy(toy: vaelib.LinearGaussian, *, exact_encoder: bool = True) -> vaelib.VAE:
    """A VAE whose generative model is ``toy``; its encoder is the exact posterior or a poorer one."""
    if exact_encoder:
        return vaelib.toy.linear_gaussian_vae(toy)
    # a shrunk mean and a three times wider scale: a proposal that still covers the posterior
    return vaelib.toy.linear_gaussian_vae(toy, mean_factor=0.5, scale_factor=3.0)


@pytest.fixture
def toy1() -> vaelib.LinearGaussian:
    return vaelib.LinearGaussian.random(x_dim=3, z_dim=1, noise_std=0.4, seed=4)


def test_vae_reproduces_the_toy_model(toy1):
    """The hand-built VAE's ELBO with the exact encoder is log p(x) (tight bound, zero-variance weights)."""
    vae = vae_from_toy(toy1)
    x, _ = toy1.sample(6)
    torch.testing.assert_close(vae.elbo(x, k=3).detach(), toy1.log_marginal(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize(("k", "batch_size"), [(1, None), (1000, 2), (3000, 5)])
def test_log_likelihood_is_exact_with_the_exact_posterior(toy1, k, batch_size):
    """With q = p(z|x), every importance weight is p(x): the estimate is exact for any k and chunking."""
    vae = vae_from_toy(toy1)
    x, _ = toy1.sample(9)
    ll = vaelib.log_likelihood(vae, x, k=k, batch_size=batch_size)
    torch.testing.assert_close(ll, toy1.log_marginal(x), rtol=0, atol=1e-9)


def test_log_likelihood_converges_from_below_with_a_poor_encoder(toy1):
    """With a poor q the estimate lies between the ELBO and log p(x), and close to log p(x) at large k."""
    vae = vae_from_toy(toy1, exact_encoder=False)
    x, _ = toy1.sample(8)
    exact = toy1.log_marginal(x)
    reps = torch.stack([vaelib.log_likelihood(vae, x, k=2000, batch_size=3) for _ in range(20)])  # (20, batch)
    se = reps.std(0) / reps.shape[0] ** 0.5
    elbo = torch.stack([vae.elbo(x, k=2000).detach() for _ in range(5)]).mean(0)
    assert bool((reps.mean(0) <= exact + 4 * se + 1e-9).all())
    assert bool((reps.mean(0) > elbo).all())
    assert bool(((exact - reps.mean(0)) < 0.05).all())


def test_log_likelihood_chunks_are_merged_correctly(toy1):
    """Splitting k into chunks gives the same distribution of estimates as one pass (same mean within SE)."""
    vae = vae_from_toy(toy1, exact_encoder=False)
    x, _ = toy1.sample(4)
    one = torch.stack([vaelib.log_likelihood(vae, x, k=64, batch_size=4) for _ in range(200)])
    vaelib.evaluate._SAMPLES_PER_PASS_DEFAULT, saved = 8, vaelib.evaluate._SAMPLES_PER_PASS_DEFAULT
    try:
        chunked = torch.stack([vaelib.log_likelihood(vae, x, k=64, batch_size=4) for _ in range(200)])
    finally:
        vaelib.evaluate._SAMPLES_PER_PASS_DEFAULT = saved
    se = (one.var(0) / 200 + chunked.var(0) / 200).sqrt()
    assert bool(((one.mean(0) - chunked.mean(0)).abs() < 4 * se).all())


def test_active_units(toy1):
    """A latent whose posterior mean varies with x is active; a constant encoder has none."""
    vae = vae_from_toy(toy1)
    x, _ = toy1.sample(500)
    assert vaelib.latent_activity(vae, x).shape == (1,)
    assert vaelib.active_units(vae, x) == 1
    with torch.no_grad():
        vae.encoder.weight.zero_()
    assert vaelib.active_units(vae, x) == 0


def test_bad_arguments(toy1):
    """k < 1, wrong feature dimension and NaN data are refused before any work."""
    vae = vae_from_toy(toy1)
    x, _ = toy1.sample(3)
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        vaelib.log_likelihood(vae, x, k=0)
    with pytest.raises(ValueError, match="x: expected 3 features"):
        vaelib.log_likelihood(vae, torch.zeros(2, 5, dtype=torch.float64), k=2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        vaelib.log_likelihood(vae, torch.full((2, 3), float("nan"), dtype=torch.float64), k=2)
    with pytest.raises(ValueError, match="batch_size"):
        vaelib.log_likelihood(vae, x, k=2, batch_size=0)
