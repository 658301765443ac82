"""The bimodal model: quadrature against a second quadrature, Monte Carlo and exact posterior samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vaelib
from tests.conftest import within_standard_errors
from vaelib.bimodal import Bimodal

SIGMA = 0.5


@pytest.fixture
def model() -> Bimodal:
    return Bimodal(noise_std=SIGMA)


@pytest.fixture
def xs() -> torch.Tensor:
    """Observations on both sides of the bimodality threshold x = sigma^2 / 2."""
    return torch.tensor([[-0.8], [0.05], [0.6], [2.0], [4.5]], dtype=torch.float64)


def _gauss_legendre(f, lo: float, hi: float, pieces: int = 400, nodes: int = 20) -> torch.Tensor:
    """Composite Gauss-Legendre integral of f(z) over [lo, hi]; f maps (n, 1, 1) to (n, batch)."""
    t, w = np.polynomial.legendre.leggauss(nodes)
    edges = np.linspace(lo, hi, pieces + 1)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    z = (edges[:-1, None] + half * (t[None, :] + 1)).ravel()
    weights = (half * w[None, :]).ravel()
    values = f(torch.from_numpy(z).reshape(-1, 1, 1))  # (n, batch)
    return (torch.from_numpy(weights)[:, None] * values).sum(0)


def _posterior_samples(model: Bimodal, x: float, n: int, seed: int) -> torch.Tensor:
    """Exact draws from p(z | x) by rejection from the prior: accept with prob p(x|z) / max_z p(x|z)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    peak = max(x, 0.0)  # the value of z^2 that maximizes the likelihood
    accept_prob = torch.exp(-((x - z**2) ** 2 - (x - peak) ** 2) / (2 * model.noise_std**2))
    return z[torch.rand(n, generator=g, dtype=torch.float64) < accept_prob]


def test_log_marginal_matches_gauss_legendre(model, xs):
    """The trapezoid evidence equals a composite Gauss-Legendre integral of p(x, z) to 1e-10."""
    integral = _gauss_legendre(lambda z: model.log_joint(xs, z).exp(), -12.0, 12.0)
    torch.testing.assert_close(model.log_marginal(xs), integral.log(), rtol=0, atol=1e-10)


def test_log_marginal_is_converged_in_the_grid(model, xs):
    """A grid 25 times finer changes log p(x) by less than 1e-12."""
    fine = Bimodal(noise_std=SIGMA, grid_size=200_001)
    torch.testing.assert_close(model.log_marginal(xs), fine.log_marginal(xs), rtol=0, atol=1e-12)


def test_log_marginal_matches_naive_monte_carlo(model, xs):
    """p(x) = E_{p(z)}[p(x | z)], within 4 standard errors of 400,000 prior draws."""
    z = torch.randn(400_000, 1, 1, dtype=torch.float64)
    lik = model.likelihood(z).log_prob(xs).exp()  # (n, batch)
    assert within_standard_errors(lik, model.log_marginal(xs).exp())


def test_marginal_integrates_to_one(model):
    """p(x) is a density over x: its integral over a wide range is 1."""
    x = torch.linspace(-5.0, 60.0, 13_001, dtype=torch.float64).reshape(-1, 1)
    total = torch.trapezoid(model.log_marginal(x).exp(), x[:, 0])
    assert abs(float(total) - 1.0) < 1e-8


def test_posterior_density_integrates_to_one_and_is_symmetric(model, xs):
    """Int p(z | x) dz = 1 by Gauss-Legendre, and p(z | x) = p(-z | x)."""
    total = _gauss_legendre(lambda z: model.posterior_log_density(xs, z.reshape(-1)).exp(), -12.0, 12.0)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-10)
    z = torch.linspace(-3, 3, 61, dtype=torch.float64)
    torch.testing.assert_close(model.posterior_log_density(xs, z), model.posterior_log_density(xs, -z))


def test_posterior_is_bimodal_above_the_threshold(model):
    """For x > sigma^2 / 2 the density has maxima at +-sqrt(x - sigma^2/2) and a dip at 0."""
    x = torch.tensor([[2.0]], dtype=torch.float64)
    mode = math.sqrt(2.0 - SIGMA**2 / 2)
    z = torch.tensor([0.0, mode - 1e-3, mode, mode + 1e-3], dtype=torch.float64)
    log_p = model.posterior_log_density(x, z)[:, 0]
    assert log_p[2] > log_p[1] and log_p[2] > log_p[3]
    assert log_p[2] > log_p[0] + 5.0


def test_posterior_histogram_matches_exact_samples(model):
    """Bin probabilities of the density match the bin frequencies of exact rejection samples."""
    x = 2.0
    z = _posterior_samples(model, x, 2_000_000, seed=1)
    edges = torch.linspace(-2.5, 2.5, 21, dtype=torch.float64)
    counts = torch.histc(z, bins=20, min=-2.5, max=2.5)
    freq = counts / z.numel()
    fine = torch.linspace(-2.5, 2.5, 20 * 400 + 1, dtype=torch.float64)
    dens = model.posterior_log_density(torch.tensor([[x]], dtype=torch.float64), fine)[:, 0].exp()
    cdf = torch.cat([dens.new_zeros(1), torch.cumulative_trapezoid(dens, fine)])  # (grid,)
    probs = cdf[::400].diff()  # (20,) probability of each bin
    se = (probs * (1 - probs) / z.numel()).sqrt().clamp_min(1e-12)
    assert bool(((freq - probs).abs() <= 4.5 * se + 1e-9).all())
    assert float(probs.sum()) == pytest.approx(float(((z > edges[0]) & (z < edges[-1])).double().mean()), abs=1e-3)


def test_posterior_moments_match_self_normalized_importance_sampling(model, xs):
    """E[z | x] and Var[z | x] by quadrature match self-normalized importance sampling from the prior."""
    mean, var = model.posterior_moments(xs)
    z = torch.randn(1_000_000, 1, 1, dtype=torch.float64)
    w = model.likelihood(z).log_prob(xs).exp()  # (n, batch)
    w = w / w.sum(0)
    z = z[:, :, 0]  # (n, 1)
    for f, target in ((z, mean), (z**2, var + mean**2)):
        estimate = (w * f).sum(0)
        se = ((w**2) * (f - estimate) ** 2).sum(0).sqrt()  # delta-method standard error
        assert bool(((estimate - target).abs() < 4 * se + 1e-12).all())
    assert bool((var > 0).all())


def test_posterior_moments_match_exact_samples(model):
    """The posterior variance by quadrature matches exact rejection samples within 4 standard errors."""
    z = _posterior_samples(model, 2.0, 1_000_000, seed=3)
    _, var = model.posterior_moments(torch.tensor([[2.0]], dtype=torch.float64))
    assert within_standard_errors(z**2, var)


def _qs(batch: int, seed: int) -> torch.distributions.Independent:
    g = torch.Generator().manual_seed(seed)
    loc = 2 * torch.randn(batch, generator=g, dtype=torch.float64)
    scale = 0.2 + torch.rand(batch, generator=g, dtype=torch.float64)
    return Bimodal.gaussian(loc, scale)


@pytest.mark.parametrize("seed", [0, 1])
def test_elbo_closed_form_matches_quadrature(model, xs, seed):
    """The closed-form ELBO (moments of q) equals the ELBO by quadrature of log p(x, z) - log q(z)."""
    q = _qs(xs.shape[0], seed)
    torch.testing.assert_close(model.elbo(xs, q), model.elbo_quadrature(xs, q), rtol=0, atol=1e-10)


def test_elbo_matches_monte_carlo(model, xs):
    """The closed-form ELBO equals the mean log weight of vaelib.log_weights within 4 standard errors."""
    q = _qs(xs.shape[0], 2)
    log_w = vaelib.log_weights(xs, q, model.log_joint, k=200_000)  # (k, batch)
    assert within_standard_errors(log_w, model.elbo(xs, q))


def test_elbo_accepts_a_multivariate_normal(model, xs):
    """A MultivariateNormal over a 1-d z gives the same ELBO as the equal Independent(Normal)."""
    q = _qs(xs.shape[0], 4)
    loc, scale = q.base_dist.loc, q.base_dist.scale
    mvn = torch.distributions.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))
    torch.testing.assert_close(model.elbo(xs, mvn), model.elbo(xs, q), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_elbo_plus_kl_to_posterior_is_log_marginal(model, xs, seed):
    """log p(x) = ELBO(q) + KL(q || p(z|x)), closed-form ELBO against quadrature KL, to 1e-8."""
    q = _qs(xs.shape[0], seed)
    lhs = model.elbo(xs, q) + model.kl_to_posterior(xs, q)
    torch.testing.assert_close(lhs, model.log_marginal(xs), rtol=0, atol=1e-8)
    assert bool((model.kl_to_posterior(xs, q) > 0).all())


def test_kl_to_posterior_matches_monte_carlo(model, xs):
    """KL(q || p(z|x)) = E_q[log q(z) - log p(z|x)] within 4 standard errors."""
    q = _qs(xs.shape[0], 5)
    z = q.sample((200_000,))  # (n, batch, 1)
    z_flat = z[..., 0]
    # log p(z | x) by Bayes' rule at each sample, from the joint and the evidence
    log_post = model.log_joint(xs, z) - model.log_marginal(xs)
    samples = q.log_prob(z) - log_post  # (n, batch)
    assert z_flat.shape == samples.shape
    assert within_standard_errors(samples, model.kl_to_posterior(xs, q))


def test_kl_from_posterior_matches_exact_samples(model):
    """KL(p(z|x) || q) = E_{p(z|x)}[log p(z|x) - log q(z)], with exact posterior draws."""
    x = torch.tensor([[2.0]], dtype=torch.float64)
    z = _posterior_samples(model, 2.0, 1_000_000, seed=4)
    q = Bimodal.gaussian(0.3, 1.1)
    samples = model.posterior_log_density(x, z)[:, 0] - q.log_prob(z.reshape(-1, 1, 1))[:, 0]
    assert within_standard_errors(samples, model.kl_from_posterior(x, q))


def test_chi_square_is_the_relative_variance_of_the_weights(model, xs):
    """chi^2(p(z|x) || q) = E_q[(w / p(x))^2] - 1 within 4 standard errors, for q wider than the posterior."""
    q = Bimodal.gaussian(torch.zeros(xs.shape[0]), 1.6 * torch.ones(xs.shape[0]))
    log_w = vaelib.log_weights(xs, q, model.log_joint, k=400_000)  # (k, batch)
    samples = torch.exp(2 * (log_w - model.log_marginal(xs))) - 1
    assert within_standard_errors(samples, model.chi_square(xs, q))


def test_moment_matched_minimizes_the_forward_kl(model, xs):
    """The moment-matched Gaussian has a smaller KL(p || q) than any nearby Gaussian."""
    best = model.moment_matched(xs)
    m, s = best.base_dist.loc[:, 0], best.base_dist.scale[:, 0]
    kl_best = model.kl_from_posterior(xs, best)
    for dm, ds in ((0.05, 1.0), (-0.05, 1.0), (0.0, 1.05), (0.0, 0.95), (0.03, 1.03)):
        other = Bimodal.gaussian(m + dm, s * ds)
        assert bool((model.kl_from_posterior(xs, other) > kl_best).all())


def test_elbo_optimum_sits_on_one_mode(model):
    """Maximizing the closed-form ELBO from m > 0 ends near the mode +sqrt(x - sigma^2/2), with a larger
    ELBO than the moment-matched Gaussian, which spans both modes."""
    x = torch.tensor([[3.0]], dtype=torch.float64)
    params = torch.tensor([1.0, math.log(0.3)], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -model.elbo(x, Bimodal.gaussian(params[0], params[1].exp())).sum()
        loss.backward()
        return loss

    opt.step(closure)
    m, s = float(params[0].detach()), math.exp(float(params[1].detach()))
    assert abs(m - math.sqrt(3.0 - SIGMA**2 / 2)) < 0.1
    _, var = model.posterior_moments(x)
    assert s < 0.5 * math.sqrt(float(var))
    q_elbo = Bimodal.gaussian(m, s)
    assert float(model.elbo(x, q_elbo)) > float(model.elbo(x, model.moment_matched(x))) + 0.1
    # the gap of the best Gaussian is about log 2: it covers one of two symmetric modes
    assert 0.5 < float(model.kl_to_posterior(x, q_elbo)) < 1.0


def test_sample_follows_the_marginal(model):
    """Draws of x pass a check against the exact mean E[x] = 1 and Var[x] = 2 + sigma^2."""
    x, z = model.sample(200_000, generator=torch.Generator().manual_seed(5))
    assert x.shape == (200_000, 1) and z.shape == (200_000, 1)
    assert within_standard_errors(x[:, 0], torch.tensor(1.0, dtype=torch.float64))
    assert within_standard_errors((x[:, 0] - 1) ** 2, torch.tensor(2 + SIGMA**2, dtype=torch.float64))


def test_reexported():
    """The model is reachable as vaelib.Bimodal, and not from the linear-Gaussian module (one path per name)."""
    assert vaelib.Bimodal is Bimodal
    assert not hasattr(vaelib.toy, "Bimodal")


def test_bad_arguments(model):
    """Bad arguments raise a ValueError or TypeError naming the argument."""
    x = torch.tensor([[1.0]], dtype=torch.float64)
    q = Bimodal.gaussian(0.0, 1.0)
    with pytest.raises(ValueError, match="noise_std"):
        Bimodal(noise_std=0.0)
    with pytest.raises(TypeError, match="grid_size"):
        Bimodal(grid_size=1.5)
    with pytest.raises(ValueError, match="grid_size"):
        Bimodal(grid_size=10)
    with pytest.raises(TypeError, match="x:"):
        model.log_marginal([[1.0]])
    with pytest.raises(ValueError, match="x:"):
        model.log_marginal(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="x:"):
        model.elbo(torch.tensor([[float("nan")]], dtype=torch.float64), q)
    with pytest.raises(TypeError, match="q:"):
        model.elbo(x, torch.distributions.Normal(0.0, 1.0))
    with pytest.raises(TypeError, match="q:"):
        model.kl_to_posterior(x, torch.distributions.Laplace(torch.zeros(1), torch.ones(1)))
    with pytest.raises(ValueError, match="scale"):
        Bimodal.gaussian(0.0, -1.0)
    with pytest.raises(ValueError, match="z_grid"):
        model.posterior_log_density(x, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="n:"):
        model.sample(0)
