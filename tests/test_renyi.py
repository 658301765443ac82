"""The variational Renyi bound: its endpoints, its order in alpha, and Pyro's RenyiELBO as an outside oracle."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal

import vaelib
from vaelib.renyi import SMALL_ONE_MINUS_ALPHA, renyi_from_log_weights


def _log_w(toy, toy_data, k=50, seed=0):
    torch.manual_seed(seed)
    q = Independent(Normal(torch.zeros(toy_data.shape[0], toy.z_dim, dtype=torch.float64), 0.8), 1)
    return vaelib.log_weights(toy_data, q, toy.log_joint, k)  # (k, batch)


def test_alpha_zero_is_the_iwae_bound(toy, toy_data):
    """At alpha = 0 the Renyi bound is the IWAE bound of the same draws."""
    log_w = _log_w(toy, toy_data)
    assert torch.allclose(renyi_from_log_weights(log_w, 0.0), vaelib.iwae_from_log_weights(log_w), atol=1e-12)


def test_alpha_to_one_is_the_elbo(toy, toy_data):
    """As alpha -> 1 the bound tends to the mean log weight; the gap is (1 - alpha) Var(log w) / 2 to first order."""
    log_w = _log_w(toy, toy_data)
    elbo = vaelib.elbo_from_log_weights(log_w)
    var = log_w.var(dim=0, unbiased=False)
    for s in (1e-4, 1e-6, 1e-9):
        gap = renyi_from_log_weights(log_w, 1.0 - s) - elbo
        assert torch.allclose(gap, s * var / 2, rtol=1e-2, atol=1e-12), s
    # The estimate does not jump where the implementation switches formulas.
    below = renyi_from_log_weights(log_w, 1.0 - SMALL_ONE_MINUS_ALPHA * (1 + 1e-9))
    above = renyi_from_log_weights(log_w, 1.0 - SMALL_ONE_MINUS_ALPHA * (1 - 1e-9))
    assert torch.allclose(below, above, atol=1e-9)


def test_non_increasing_in_alpha(toy, toy_data):
    """For the same draws the bound never increases with alpha (the power mean is monotone in its order)."""
    log_w = _log_w(toy, toy_data)
    alphas = torch.linspace(0, 0.999, 40).tolist()
    values = torch.stack([renyi_from_log_weights(log_w, a) for a in alphas])  # (40, batch)
    steps = values[1:] - values[:-1]
    assert bool((steps <= 1e-12).all())
    assert bool((values[0] - values[-1] > 1e-3).all())  # strictly lower somewhere: weights are not all equal


def test_between_elbo_and_log_marginal_in_expectation(toy, toy_data):
    """Averaged over draws, L_alpha (k = 10) lies between the ELBO and log p(x), by more than 4 standard errors."""
    log_w = _log_w(toy, toy_data, k=10 * 4000).reshape(4000, 10, -1).transpose(0, 1)  # (10, 4000, batch)
    per = renyi_from_log_weights(log_w, 0.5)  # (4000, batch)
    mean, se = per.mean(0), per.std(0) / 4000**0.5
    elbo = toy.elbo(toy_data, Independent(Normal(torch.zeros_like(toy_data[:, : toy.z_dim]), 0.8), 1))
    assert bool((mean - elbo > 4 * se).all())
    assert bool((toy.log_marginal(toy_data) - mean > 4 * se).all())


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9])
def test_matches_pyro_renyi_elbo(toy, toy_data, alpha):
    """Pyro's RenyiELBO, sequential particles, gives the same number from the same random draws."""
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as dist
    from pyro.infer import RenyiELBO

    x = toy_data[:1]  # (1, x_dim)
    loc = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    scale = torch.tensor([[0.8, 0.6]], dtype=torch.float64)

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros_like(loc), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ toy.W.T + toy.b, toy.noise_std).to_event(1), obs=x)

    def guide():
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    pyro.clear_param_store()
    torch.manual_seed(3)
    theirs = -RenyiELBO(alpha=alpha, num_particles=7, vectorize_particles=False).loss(model, guide)
    torch.manual_seed(3)
    log_w = vaelib.log_weights(x, Independent(Normal(loc, scale), 1), toy.log_joint, k=7)  # (7, 1)
    ours = renyi_from_log_weights(log_w, alpha)
    assert abs(float(ours) - theirs) < 1e-10


def test_objective_trains_a_vae():
    """The objective is (vae, x) -> (batch,) and its value is the bound of the VAE's own log weights."""
    vae = vaelib.VAE.mlp(x_dim=6, z_dim=2, hidden=(8,)).double()
    x = torch.bernoulli(torch.full((4, 6), 0.5, dtype=torch.float64))
    torch.manual_seed(1)
    value = vaelib.Renyi(0.5, k=3)(vae, x)
    torch.manual_seed(1)
    assert torch.allclose(value, renyi_from_log_weights(vae.log_weights(x, 3), 0.5), atol=1e-12)
    value.sum().backward()
    assert all(p.grad is not None for p in vae.parameters())


@pytest.mark.parametrize(("alpha", "error"), [(1.0, ValueError), (-0.1, ValueError), ("0.5", TypeError)])
def test_bad_alpha(toy, toy_data, alpha, error):
    """alpha outside [0, 1), or not a number, is refused before any work."""
    with pytest.raises(error, match="alpha"):
        renyi_from_log_weights(_log_w(toy, toy_data), alpha)
    with pytest.raises(error, match="alpha"):
        vaelib.Renyi(alpha)
