"""The VAE: distributions, bounds, shapes, dtype and device following."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

import vaelib


@pytest.fixture
def vae() -> vaelib.VAE:
    return vaelib.VAE.mlp(x_dim=6, z_dim=3, hidden=(16, 16), activation="tanh", likelihood="bernoulli")


@pytest.fixture
def x() -> torch.Tensor:
    return torch.bernoulli(torch.full((5, 6), 0.4))


def test_distributions_are_torch_distributions(vae, x):
    """prior, encode and decode return torch.distributions with the documented shapes."""
    assert isinstance(vae.prior, Independent) and vae.prior.event_shape == (3,)
    q = vae.encode(x)
    assert isinstance(q.base_dist, Normal) and q.batch_shape == (5,) and q.event_shape == (3,)
    px = vae.decode(torch.zeros(4, 5, 3))
    assert isinstance(px.base_dist, Bernoulli) and px.batch_shape == (4, 5) and px.event_shape == (6,)


def test_log_weights_are_joint_minus_q(vae, x):
    """log w = log p(z) + log p(x|z) - log q(z|x) at the sampled z (same seed, two code paths)."""
    torch.manual_seed(3)
    log_w = vae.log_weights(x, k=4)
    torch.manual_seed(3)
    q = vae.encode(x)
    z = q.rsample((4,))
    expected = vae.prior.log_prob(z) + vae.decode(z).log_prob(x) - q.log_prob(z)
    torch.testing.assert_close(log_w, expected)
    assert log_w.shape == (4, 5)


def test_elbo_and_iwae_use_the_bound_functions(vae, x):
    """vae.elbo and vae.iwae equal the estimators applied to vae.log_weights under one seed."""
    torch.manual_seed(0)
    elbo = vae.elbo(x, k=3)
    torch.manual_seed(0)
    torch.testing.assert_close(elbo, vaelib.elbo_from_log_weights(vae.log_weights(x, k=3)))
    torch.manual_seed(0)
    iwae = vae.iwae(x, k=3)
    torch.manual_seed(0)
    torch.testing.assert_close(iwae, vaelib.iwae_from_log_weights(vae.log_weights(x, k=3)))


def test_analytic_kl_elbo_agrees_with_monte_carlo(vae, x):
    """The analytic-KL ELBO and the plain Monte Carlo ELBO have the same mean (within 4 standard errors)."""
    vae.double()
    x = x.double()
    n = 4000
    mc = vae.elbo(x, k=n).detach()
    per_sample = vae.log_weights(x, k=n).detach()  # (n, batch)
    se_mc = per_sample.std(0) / n**0.5
    analytic = vae.elbo(x, k=n, analytic_kl=True).detach()
    assert bool(((mc - analytic).abs() < 4 * se_mc + 1e-9).all())


def test_analytic_kl_matches_monte_carlo_kl(vae, x):
    """Closed-form KL(q || p(z)) agrees with the Monte Carlo average of log q - log p."""
    q = vae.encode(x)
    z = q.sample((50_000,))
    samples = (q.log_prob(z) - vae.prior.log_prob(z)).detach()  # (n, batch)
    se = samples.std(0) / samples.shape[0] ** 0.5
    assert bool(((samples.mean(0) - kl_divergence(q, vae.prior).detach()).abs() < 4 * se).all())


def test_gaussian_likelihood_and_relu(x):
    """A Gaussian decoder returns Normal with a positive scale; ReLU networks build."""
    vae = vaelib.VAE.mlp(x_dim=6, z_dim=2, hidden=(8,), activation="relu", likelihood="gaussian")
    px = vae.decode(torch.zeros(5, 2))
    assert isinstance(px.base_dist, Normal) and bool((px.base_dist.scale > 0).all())
    assert bool(torch.isfinite(vae.elbo(x)).all())


def test_double_precision_follows_parameters(vae, x):
    """vae.double() makes every bound float64."""
    vae.double()
    assert vae.elbo(x.double()).dtype == torch.float64
    assert vae.iwae(x.double(), k=2).dtype == torch.float64
    assert vae.prior.sample((2,)).dtype == torch.float64


def test_sample_and_reconstruct(vae, x):
    """Samples and reconstructions are decoder means in [0, 1] with the data's shape."""
    s = vae.sample(7)
    r = vae.reconstruct(x)
    assert s.shape == (7, 6) and r.shape == x.shape
    assert 0 <= float(s.min()) and float(s.max()) <= 1


def test_custom_networks():
    """A VAE takes any encoder and decoder that map to the documented widths."""
    enc = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2 * 2))
    dec = torch.nn.Linear(2, 4)
    vae = vaelib.VAE(enc, dec, x_dim=4, z_dim=2, likelihood="bernoulli")
    assert vae.elbo(torch.ones(3, 4)).shape == (3,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "gelu"}, "activation: expected one of"),
        ({"likelihood": "poisson"}, "likelihood: expected one of"),
        ({"z_dim": 0}, "z_dim: expected an integer >= 1"),
        ({"hidden": (8, -1)}, "hidden: expected an integer >= 1"),
    ],
)
def test_bad_architecture(kwargs, message):
    """Unknown activations or likelihoods and non-positive sizes are refused."""
    args = {"x_dim": 4, "z_dim": 2, "hidden": (8,), **kwargs}
    with pytest.raises(ValueError, match=message):
        vaelib.VAE.mlp(**args)


def test_save_and_load_roundtrip(tmp_path, vae, x):
    """A saved model reloads with the same architecture and outputs."""
    path = vaelib.save(vae, tmp_path / "m.pt")
    loaded = vaelib.load(path)
    assert loaded.config == vae.config
    torch.testing.assert_close(loaded.encode(x).mean, vae.encode(x).mean)
