"""Importance-sampled log-likelihood, its diagnostics (standard error, ESS, Pareto k-hat) and active units."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

import vaelib
from vaelib.evaluate import LogLikelihood, pareto_khat
from vaelib.protocols import AmortizedModel


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


class PPCA:
    """Probabilistic PCA (Tipping and Bishop 1999): z ~ N(0, I), x | z ~ N(W z + mu, sigma^2 I), and an
    encoder that is the exact posterior with its covariance scaled by ``width**2``."""

    def __init__(self, W: torch.Tensor, mu: torch.Tensor, sigma: float, width: float = 1.0) -> None:
        self.W, self.mu, self.sigma, self.width = W, mu, sigma, width
        self.x_shape = (W.shape[0],)

    @property
    def prior(self) -> Independent:
        zeros = torch.zeros(self.W.shape[1], dtype=self.W.dtype)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def decode(self, z: torch.Tensor) -> Independent:
        loc = z @ self.W.T + self.mu  # (..., x_dim)
        return Independent(Normal(loc, torch.full_like(loc, self.sigma)), 1)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.prior.log_prob(z) + self.decode(z).log_prob(x)

    def encode(self, x: torch.Tensor) -> MultivariateNormal:
        z_dim = self.W.shape[1]
        M = self.W.T @ self.W + self.sigma**2 * torch.eye(z_dim, dtype=self.W.dtype)  # (z_dim, z_dim)
        mean = torch.linalg.solve(M, self.W.T @ (x - self.mu).T).T  # (batch, z_dim)
        cov = self.sigma**2 * torch.linalg.inv(M) * self.width**2
        return MultivariateNormal(mean, covariance_matrix=cov.expand(x.shape[0], z_dim, z_dim))

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return MultivariateNormal(self.mu, covariance_matrix=cov).log_prob(x)


@pytest.fixture
def toy() -> vaelib.LinearGaussian:
    return vaelib.LinearGaussian.random(x_dim=5, z_dim=2, noise_std=0.5, seed=3)


def ppca(toy: vaelib.LinearGaussian, width: float = 1.0) -> PPCA:
    return PPCA(toy.W, toy.b, toy.noise_std, width)


def test_ppca_is_an_amortized_model(toy):
    """The hand-written PPCA satisfies the protocol, and its exact log p(x) agrees with vaelib's toy model."""
    model = ppca(toy)
    assert isinstance(model, AmortizedModel)
    x, _ = toy.sample(7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.log_marginal(x), toy.log_marginal(x), rtol=0, atol=1e-10)


def test_exact_posterior_gives_exact_log_likelihood(toy):
    """With q = p(z|x) every weight is p(x): the estimate is exact, its standard error 0 and ESS = k."""
    model = ppca(toy)
    x, _ = toy.sample(9, generator=torch.Generator().manual_seed(1))
    result = vaelib.log_likelihood(model, x, k=500, return_diagnostics=True, seed=0, progress=False)
    assert isinstance(result, LogLikelihood)
    torch.testing.assert_close(result.log_px, model.log_marginal(x), rtol=0, atol=1e-9)
    assert float(result.se.max()) < 1e-6
    torch.testing.assert_close(result.ess, torch.full((9,), 500.0, dtype=torch.float64), rtol=1e-9, atol=0)


def test_wide_proposal_is_within_its_standard_errors(toy):
    """A proposal 1.5 times wider than the posterior: the estimate is within 4 reported standard errors of
    the exact log p(x), the reported standard error matches the spread over repetitions, and k-hat is small."""
    model = ppca(toy, width=1.5)
    x, _ = toy.sample(8, generator=torch.Generator().manual_seed(2))
    exact = model.log_marginal(x)
    result = vaelib.log_likelihood(model, x, k=4000, return_diagnostics=True, seed=1, progress=False)
    assert bool(((result.log_px - exact).abs() < 4 * result.se).all())
    assert bool((result.ess > 0.3 * 4000).all())
    reps = torch.stack(
        [vaelib.log_likelihood(model, x, k=4000, seed=s, progress=False) for s in range(10, 40)]
    )  # (30, 8)
    ratio = reps.std(dim=0) / result.se  # sample std of 30 draws: within about +-40% of the truth
    assert bool(((ratio > 0.5) & (ratio < 1.6)).all()), ratio
    assert result.khat is not None and float(result.khat.max()) < result.khat_threshold


def test_narrow_proposal_is_flagged_by_khat(toy):
    """A proposal 0.05 times as wide as the posterior: repeated estimates at k = 5000 agree to a fraction
    of a nat and report a small standard error, yet they are nats below log p(x); k-hat flags every point."""
    model = ppca(toy, width=0.05)
    x, _ = toy.sample(8, generator=torch.Generator().manual_seed(2))
    exact = model.log_marginal(x)
    result = vaelib.log_likelihood(model, x, k=5000, return_diagnostics=True, seed=1, progress=False)
    reps = torch.stack([vaelib.log_likelihood(model, x, k=5000, seed=s, progress=False) for s in range(2, 7)])
    gap = float((exact - reps.mean(dim=0)).mean())
    assert gap > 2.0
    assert gap > 4 * float(reps.std(dim=0).mean()) and gap > 4 * float(result.se.mean())
    assert result.khat is not None
    assert bool((result.khat > result.khat_threshold).all()), result.khat


@pytest.mark.parametrize("shape", [0.2, 0.67, 1.25])
def test_khat_recovers_a_known_tail_shape(shape):
    """Weights drawn from a generalized Pareto distribution of shape xi: k-hat is xi within 4 standard
    errors, (1 + xi) / sqrt(M) for the M tail draws PSIS fits. This pins the sign convention: ArviZ 0.x
    takes the log weights as they are (negated, these weights would give k-hat near 1 for every xi)."""
    k = 100_000
    g = torch.Generator().manual_seed(0)
    u = torch.rand(k, 3, generator=g, dtype=torch.float64)  # (k, batch)
    w = (u ** (-shape) - 1) / shape  # GPD(0, 1, xi) by inversion
    khat = pareto_khat(torch.log(w))
    assert khat.shape == (3,)
    tail = min(k / 5, 3 * math.sqrt(k))  # PSIS's tail length (Vehtari et al. 2024, section 3)
    se = (1 + shape) / math.sqrt(tail)
    assert bool(((khat - shape).abs() < 4 * se).all()), khat


def test_pareto_khat_needs_enough_samples():
    """Fewer than 25 weights per point is refused."""
    with pytest.raises(ValueError, match="k >= 25"):
        pareto_khat(torch.zeros(10, 2))


def test_latent_activity_and_elbo_surrogate_accept_any_model(toy):
    """latent_activity of the PPCA is the variance of the toy model's posterior means; the analytic-KL
    surrogate of the PPCA has the toy model's exact ELBO as its mean."""
    model = ppca(toy, width=1.3)
    x, _ = toy.sample(50, generator=torch.Generator().manual_seed(4))
    expected = toy.posterior(x).mean.var(dim=0, unbiased=False)
    torch.testing.assert_close(vaelib.latent_activity(model, x), expected, rtol=1e-9, atol=1e-12)
    q = model.encode(x[:4])
    samples = torch.stack([vaelib.elbo_surrogate(x[:4], q, model, estimator="analytic_kl") for _ in range(2000)])
    se = samples.std(dim=0) / math.sqrt(2000)
    assert bool(((samples.mean(dim=0) - toy.elbo(x[:4], q)).abs() < 4 * se).all())


def test_seed_repeats_and_leaves_the_caller_alone(toy):
    """seed= gives equal estimates and weights twice, other seeds differ, and the global generator is untouched."""
    model = ppca(toy, width=1.5)
    x, _ = toy.sample(4, generator=torch.Generator().manual_seed(5))
    vae = vaelib.VAE.mlp(5, 2, hidden=(8,), likelihood="gaussian")
    torch.manual_seed(123)
    expected = torch.rand(2)
    torch.manual_seed(123)
    a = vaelib.log_likelihood(model, x, k=50, seed=7, progress=False)
    b = vaelib.log_likelihood(model, x, k=50, seed=7, progress=False)
    c = vaelib.log_likelihood(model, x, k=50, seed=8, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    w1, w2 = vae.log_weights(x.float(), k=6, seed=1), vae.log_weights(x.float(), k=6, seed=1)
    assert torch.equal(w1, w2) and not torch.equal(w1, vae.log_weights(x.float(), k=6, seed=2))
    assert torch.equal(torch.rand(2), expected)


def test_bernoulli_model_warns_on_grey_data():
    """Scoring grey values with a Bernoulli model warns; binarize=True draws 0/1 data (repeatably with a seed)."""
    vae = vaelib.VAE.mlp(64, 2, hidden=(8,))
    grey = vaelib.data.load_digits()[1][:10]
    with pytest.warns(UserWarning, match="values other than 0 and 1"):
        vaelib.log_likelihood(vae, grey, k=5, progress=False)
    a = vaelib.log_likelihood(vae, grey, k=5, binarize=True, seed=3, progress=False)
    b = vaelib.log_likelihood(vae, grey, k=5, binarize=True, seed=3, progress=False)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="binarize: binarizing the data applies to a Bernoulli"):
        vaelib.log_likelihood(vaelib.VAE.mlp(64, 2, likelihood="gaussian"), grey, k=5, binarize=True)


def test_a_model_without_encode_is_refused():
    """An object lacking encode/log_joint raises a TypeError naming the protocol."""
    with pytest.raises(TypeError, match="model: expected a model with encode"):
        vaelib.log_likelihood(object(), torch.zeros(2, 3), k=2)
