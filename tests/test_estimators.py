"""Gradient estimators of the ELBO: unbiased, and ordered in variance on the linear-Gaussian model."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal

import vaelib
from vaelib.estimators import elbo_surrogate, gradient_samples


def _setup(toy, toy_data):
    loc = torch.zeros(toy_data.shape[0], toy.z_dim, dtype=torch.float64, requires_grad=True)
    log_scale = torch.full((toy_data.shape[0], toy.z_dim), -0.5, dtype=torch.float64, requires_grad=True)

    def make_q(loc, log_scale):
        return Independent(Normal(loc, log_scale.exp()), 1)

    exact = torch.autograd.grad(toy.elbo(toy_data, make_q(loc, log_scale)).sum(), [loc, log_scale])
    return [loc, log_scale], make_q, torch.cat([g.reshape(-1) for g in exact])


@pytest.mark.parametrize("estimator", ["reparam", "score", "analytic_kl"])
def test_estimators_are_unbiased(toy, toy_data, estimator):
    """The mean gradient of each estimator matches the exact gradient within 4 standard errors."""
    params, make_q, exact = _setup(toy, toy_data)
    grads = gradient_samples(toy_data, params, make_q, toy, estimator=estimator, n=3000, k=1)
    se = grads.std(0) / grads.shape[0] ** 0.5
    assert bool(((grads.mean(0) - exact).abs() <= 4 * se + 1e-9).all())


def test_variance_ordering(toy, toy_data):
    """On this model the score function is far noisier than the reparameterization gradient."""
    params, make_q, _ = _setup(toy, toy_data)
    var = {
        est: gradient_samples(toy_data, params, make_q, toy, estimator=est, n=1000).var(0).sum()
        for est in ("reparam", "score", "analytic_kl")
    }
    assert var["score"] > 10 * var["reparam"]
    assert var["analytic_kl"] < var["reparam"]


def test_surrogate_values_are_elbo_estimates(toy, toy_data):
    """Every surrogate's value averages to the exact ELBO (within 4 standard errors)."""
    q = Independent(Normal(torch.zeros(toy_data.shape[0], toy.z_dim, dtype=torch.float64), 0.7), 1)
    exact = toy.elbo(toy_data, q)
    for estimator in ("reparam", "score", "analytic_kl"):
        values = elbo_surrogate(toy_data, q, toy, k=20_000, estimator=estimator)
        # Per-sample spread from a second draw bounds the standard error of the mean.
        per = vaelib.log_weights(toy_data, q, toy.log_joint, k=20_000)
        se = per.std(0) / 20_000**0.5
        assert bool(((values - exact).abs() < 4 * se).all()), estimator


def test_unknown_estimator(toy, toy_data):
    """An unknown estimator name is refused."""
    q = Independent(Normal(torch.zeros(toy_data.shape[0], toy.z_dim, dtype=torch.float64), 1.0), 1)
    with pytest.raises(ValueError, match="estimator: expected one of"):
        elbo_surrogate(toy_data, q, toy, estimator="reinforce")


def test_surrogate_works_for_a_vae():
    """The analytic-KL surrogate of a VAE equals vae.elbo(analytic_kl=True) under the same seed."""
    vae = vaelib.VAE.mlp(x_dim=5, z_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((4, 5), 0.5))
    torch.manual_seed(1)
    a = elbo_surrogate(x, vae.encode(x), vae, k=3, estimator="analytic_kl")
    torch.manual_seed(1)
    b = vae.elbo(x, k=3, analytic_kl=True)
    torch.testing.assert_close(a, b)


def test_batched_gradients_match_the_loop(toy, toy_data):
    """batched=True gives the looped estimates under one seed (n = 1) and the same mean and variance."""
    params, make_q, exact = _setup(toy, toy_data)
    for estimator in ("reparam", "score", "analytic_kl"):
        torch.manual_seed(4)
        one = gradient_samples(toy_data, params, make_q, toy, estimator=estimator, n=1, k=2, batched=True)
        torch.manual_seed(4)
        loop = gradient_samples(toy_data, params, make_q, toy, estimator=estimator, n=1, k=2)
        torch.testing.assert_close(one, loop, rtol=0, atol=1e-10)
    many = gradient_samples(toy_data, params, make_q, toy, estimator="reparam", n=4000, batched=True)
    se = many.std(0) / many.shape[0] ** 0.5
    assert many.shape == (4000, exact.numel())
    assert bool(((many.mean(0) - exact).abs() <= 4 * se + 1e-9).all())
