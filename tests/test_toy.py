"""Exact identities of the linear-Gaussian model, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import vaelib
from tests.conftest import gaussian_q
from vaelib.estimators import kl


def test_log_marginal_matches_closed_form_gaussian(toy, toy_data):
    """log p(x) equals the density of N(b, W W^T + sigma^2 I), computed independently."""
    cov = toy.W @ toy.W.T + toy.noise_std**2 * torch.eye(toy.x_dim, dtype=torch.float64)
    diff = toy_data - toy.b
    _, logdet = torch.linalg.slogdet(cov)
    quad = torch.einsum("bi,ij,bj->b", diff, torch.linalg.inv(cov), diff)
    expected = -0.5 * (toy.x_dim * math.log(2 * math.pi) + logdet + quad)
    torch.testing.assert_close(toy.log_marginal(toy_data), expected, rtol=0, atol=1e-12)


def test_log_marginal_matches_quadrature_over_z():
    """With a 1-d latent, log p(x) equals log of the integral of p(x, z) by the trapezoid rule."""
    toy = vaelib.LinearGaussian.random(x_dim=2, z_dim=1, noise_std=0.5, seed=0)
    x, _ = toy.sample(4, generator=torch.Generator().manual_seed(3))
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64).reshape(-1, 1, 1)  # (grid, 1, z_dim)
    log_joint = toy.log_joint(x, z)  # (grid, batch)
    integral = torch.trapezoid(log_joint.exp(), dx=float(z[1, 0, 0] - z[0, 0, 0]), dim=0)
    torch.testing.assert_close(toy.log_marginal(x), integral.log(), rtol=0, atol=1e-9)


def test_posterior_is_bayes_rule(toy, toy_data):
    """log p(z | x) = log p(x, z) - log p(x) at arbitrary z."""
    z = torch.randn(7, toy_data.shape[0], toy.z_dim, dtype=torch.float64)
    lhs = toy.posterior(toy_data).log_prob(z)
    rhs = toy.log_joint(toy_data, z) - toy.log_marginal(toy_data)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_elbo_plus_kl_to_posterior_is_log_marginal(toy, toy_data, seed):
    """For any Gaussian q: ELBO(q) + KL(q || p(z|x)) = log p(x) exactly."""
    q = gaussian_q(toy_data.shape[0], toy.z_dim, seed=seed)
    lhs = toy.elbo(toy_data, q) + kl(q, toy.posterior(toy_data))
    torch.testing.assert_close(lhs, toy.log_marginal(toy_data), rtol=0, atol=1e-10)
    assert bool((toy.elbo(toy_data, q) < toy.log_marginal(toy_data)).all())


def test_elbo_is_tight_at_the_posterior(toy, toy_data):
    """With q equal to the posterior the ELBO equals log p(x) and the log weights are constant."""
    post = toy.posterior(toy_data)
    torch.testing.assert_close(toy.elbo(toy_data, post), toy.log_marginal(toy_data), rtol=0, atol=1e-10)
    log_w = vaelib.log_weights(toy_data, post, toy.log_joint, k=50)  # (50, batch)
    torch.testing.assert_close(log_w, toy.log_marginal(toy_data).expand_as(log_w), rtol=0, atol=1e-10)


def test_expected_log_likelihood_matches_monte_carlo(toy, toy_data):
    """The closed-form reconstruction term agrees with its Monte Carlo estimate within 4 standard errors."""
    q = gaussian_q(toy_data.shape[0], toy.z_dim, seed=5)
    z = q.sample((20_000,))  # (n, batch, z_dim)
    samples = toy.likelihood(z).log_prob(toy_data)  # (n, batch)
    n = samples.shape[0]
    se = samples.std(0) / n**0.5
    assert bool(((samples.mean(0) - toy.expected_log_likelihood(toy_data, q)).abs() < 4 * se).all())


def test_prior_likelihood_shapes(toy):
    """The distributions have the documented event and batch shapes."""
    assert toy.prior.event_shape == (toy.z_dim,)
    z = torch.zeros(4, 6, toy.z_dim, dtype=torch.float64)
    lik = toy.likelihood(z)
    assert lik.event_shape == (toy.x_dim,) and lik.batch_shape == (4, 6)
    x, z = toy.sample(8)
    assert x.shape == (8, toy.x_dim) and z.shape == (8, toy.z_dim)
    post = toy.posterior(x)
    assert post.event_shape == (toy.z_dim,) and post.batch_shape == (8,)


def test_sample_follows_the_marginal(toy):
    """Samples of x have the marginal's mean within 4 standard errors."""
    x, _ = toy.sample(50_000, generator=torch.Generator().manual_seed(0))
    se = x.std(0) / x.shape[0] ** 0.5
    assert bool(((x.mean(0) - toy.b).abs() < 4 * se).all())


def test_as_multivariate_normal_keeps_the_density():
    """A diagonal Independent(Normal) and its MultivariateNormal form give the same log density."""
    q = gaussian_q(3, 2, seed=0)
    mvn = vaelib.as_multivariate_normal(q)
    assert isinstance(mvn, MultivariateNormal)
    z = torch.randn(5, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(mvn.log_prob(z), q.log_prob(z), rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="q: expected a Gaussian"):
        vaelib.as_multivariate_normal(torch.distributions.Laplace(torch.zeros(2), 1.0))


def test_bad_arguments():
    """Invalid sizes and noise are refused with the argument's name."""
    with pytest.raises(ValueError, match="noise_std"):
        vaelib.LinearGaussian.random(x_dim=2, z_dim=1, noise_std=0.0)
    with pytest.raises(ValueError, match="x_dim"):
        vaelib.LinearGaussian.random(x_dim=0, z_dim=1)
    with pytest.raises(ValueError, match="b: expected shape"):
        vaelib.LinearGaussian(W=torch.ones(3, 2), b=torch.ones(2), noise_std=1.0)


# -- linear_gaussian_vae ---------------------------------------------------------


@pytest.fixture
def toy1() -> vaelib.LinearGaussian:
    return vaelib.LinearGaussian.random(x_dim=3, z_dim=1, noise_std=0.4, seed=4)


def test_linear_gaussian_vae_decoder_is_the_toy_likelihood(toy1):
    """The decoder's Gaussian scores x exactly as the linear-Gaussian likelihood does."""
    vae = vaelib.toy.linear_gaussian_vae(toy1)
    x, _ = toy1.sample(5, generator=torch.Generator().manual_seed(1))
    z = torch.randn(7, 5, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(vae.decode(z).log_prob(x), toy1.likelihood(z).log_prob(x), rtol=0, atol=1e-12)


def test_linear_gaussian_vae_exact_encoder_is_the_posterior(toy1):
    """With the default factors q(z|x) is p(z|x), so the ELBO equals log p(x) for any k."""
    vae = vaelib.toy.linear_gaussian_vae(toy1)
    x, _ = toy1.sample(6, generator=torch.Generator().manual_seed(3))
    post = toy1.posterior(x)
    q = vae.encode(x)
    torch.testing.assert_close(q.mean, post.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.variance, post.covariance_matrix.diagonal(dim1=-2, dim2=-1), rtol=0, atol=1e-12)
    torch.manual_seed(0)
    torch.testing.assert_close(vae.elbo(x, k=3).detach(), toy1.log_marginal(x), rtol=0, atol=1e-9)


def test_linear_gaussian_vae_poorer_encoder_matches_closed_form_elbo(toy1):
    """A shrunk, widened q: the Monte Carlo ELBO agrees with toy.elbo within 4 SE, and lies below log p(x)."""
    vae = vaelib.toy.linear_gaussian_vae(toy1, mean_factor=0.8, scale_factor=1.3)
    x, _ = toy1.sample(5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        closed = toy1.elbo(x, vae.encode(x))  # (5,)
        log_w = vae.log_weights(x, k=20_000, seed=6)  # (20000, 5)
    mc, se = log_w.mean(0), log_w.std(0) / log_w.shape[0] ** 0.5
    assert bool(((mc - closed).abs() < 4 * se).all())
    # the encoder is really poorer: the closed-form gap is far above the Monte Carlo error
    assert bool((toy1.log_marginal(x) - closed > 10 * se).all())


def test_linear_gaussian_vae_orthogonal_columns():
    """With orthogonal columns of W the posterior is diagonal for z_dim > 1, and the ELBO is tight."""
    q_mat, _ = torch.linalg.qr(torch.randn(5, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    W = q_mat * torch.tensor([2.0, 0.5], dtype=torch.float64)  # (5, 2), orthogonal columns of unequal length
    toy = vaelib.LinearGaussian(W=W, b=torch.arange(5.0, dtype=torch.float64), noise_std=0.3)
    vae = vaelib.toy.linear_gaussian_vae(toy)
    x, _ = toy.sample(4, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(vae.elbo(x, k=2).detach(), toy.log_marginal(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((object(),), {}, TypeError, "toy: expected a vaelib.LinearGaussian"),
        (("toy2",), {}, ValueError, "toy: the exact posterior covariance"),
        (("toy1",), {"scale_factor": 0.0}, ValueError, "scale_factor: expected a positive"),
        (("toy1",), {"mean_factor": float("nan")}, ValueError, "mean_factor: expected a finite"),
        (("toy1",), {"mean_factor": "0.5"}, TypeError, "mean_factor: expected a number"),
        (("toy1",), {"scale_factor": 1e-9}, ValueError, "scale_factor: the encoder's scales"),
    ],
)
def test_linear_gaussian_vae_bad_arguments(toy1, args, kwargs, error, message):
    """Wrong types, non-finite or non-positive factors and a non-diagonal posterior are refused."""
    toys = {"toy1": toy1, "toy2": vaelib.LinearGaussian.random(x_dim=3, z_dim=2, seed=0)}
    args = tuple(toys.get(a, a) if isinstance(a, str) else a for a in args)
    with pytest.raises(error, match=message):
        vaelib.toy.linear_gaussian_vae(*args, **kwargs)
