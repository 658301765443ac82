"""The flow posterior: shapes, its density against a second route, and the training and evaluation paths."""

from __future__ import annotations

import math

import pytest
import torch

import vaelib
from vaelib.bimodal import Bimodal
from vaelib.flows import FlowVAE, fit_flow_posterior
from vaelib.gaps import inference_gaps, optimize_posterior


@pytest.fixture
def flow_vae() -> FlowVAE:
    return FlowVAE.mlp(x_dim=12, z_dim=3, hidden=(16,), transforms=2, flow_hidden=(16,))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(7, 12, generator=torch.Generator().manual_seed(0)).round()


def test_encode_shapes_and_density_of_own_draws(flow_vae, x):
    """Batch (7,), event (3,); the remembered density equals the exact inverse route."""
    q = flow_vae.encode(x)
    assert q.batch_shape == (7,) and q.event_shape == (3,)
    z = q.rsample((5,))  # (5, 7, 3)
    assert z.shape == (5, 7, 3)
    remembered = q.log_prob(z)
    recomputed = q.log_prob(z.clone())  # a new tensor: inverted layer by layer
    assert remembered.shape == (5, 7)
    assert torch.allclose(remembered, recomputed, atol=1e-4)


def test_no_flow_layers_is_the_gaussian_encoder(x):
    """With zero spline layers the flow is the VAE's diagonal Gaussian."""
    torch.manual_seed(0)
    flow_vae = FlowVAE.mlp(x_dim=12, z_dim=3, hidden=(16,), transforms=0)
    vae = vaelib.VAE(flow_vae.encoder, flow_vae.decoder, x_dim=12, z_dim=3)
    z = vae.encode(x).sample((4,))
    assert torch.allclose(flow_vae.encode(x).log_prob(z), vae.encode(x).log_prob(z), atol=1e-5)


def test_density_integrates_to_one_by_importance_sampling():
    """E_{z ~ N(0, 4I)}[q(z) / N(z; 0, 4I)] = 1 for the flow's density (a change-of-variables check)."""
    torch.set_default_dtype(torch.float64)
    try:
        flow_vae = FlowVAE.mlp(x_dim=4, z_dim=2, hidden=(8,), transforms=2, flow_hidden=(8,))
        x = torch.ones(1, 4)
        wide = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), 2.0 * torch.ones(2)), 1)
        z = wide.sample((40_000,)).unsqueeze(1)  # (n, 1, 2)
        with torch.no_grad():
            ratio = (flow_vae.encode(x).log_prob(z) - wide.log_prob(z)).exp()[:, 0]  # (n,)
        se = ratio.std() / ratio.shape[0] ** 0.5
        assert abs(ratio.mean() - 1) < 4 * se
    finally:
        torch.set_default_dtype(torch.float32)


def test_fit_and_log_likelihood_work_unchanged(flow_vae, x):
    """fit with the ELBO and the IWAE bound, then log_likelihood: finite, and log p(x) >= ELBO on average."""
    data = torch.rand(60, 12, generator=torch.Generator().manual_seed(1)).round()
    for objective in (vaelib.ELBO(k=3), vaelib.IWAE(k=3)):
        history = vaelib.fit(flow_vae, data, objective=objective, epochs=2, batch_size=20, progress=False)
        assert all(math.isfinite(b) for b in history.train_bound)
    log_px = vaelib.log_likelihood(flow_vae, x, k=500, seed=0, progress=False)
    elbo = flow_vae.elbo(x, k=500).detach()
    assert log_px.shape == (7,) and torch.isfinite(log_px).all()
    diff = log_px - elbo
    assert diff.mean() > 0


def test_analytic_kl_is_refused(flow_vae, x):
    with pytest.raises(ValueError, match="analytic_kl"):
        flow_vae.elbo(x, analytic_kl=True)


def test_checkpoint_round_trip(flow_vae, x, tmp_path):
    """save, then load into a model of the same architecture, gives the same density."""
    path = vaelib.save(flow_vae, tmp_path / "flow.pt")
    other = FlowVAE.mlp(x_dim=12, z_dim=3, hidden=(16,), transforms=2, flow_hidden=(16,))
    loaded = vaelib.load(path, model=other)
    z = flow_vae.encode(x).sample((3,)).clone()
    assert torch.allclose(loaded.encode(x).log_prob(z), flow_vae.encode(x).log_prob(z), atol=1e-5)


def test_flow_family_gaps(flow_vae, x):
    """The flow family (a free context per point): log p(x) from q* agrees with the encoder's; q* is no worse."""
    gaps = inference_gaps(flow_vae, x, family="flow", k=2000, k_elbo=100, steps=20, seed=0)
    assert gaps.log_px.shape == (7,) and torch.isfinite(gaps.log_px).all()
    with torch.no_grad():
        log_px = vaelib.log_likelihood(flow_vae, x, k=2000, seed=1)  # the encoder as the proposal
    diff = gaps.log_px - log_px
    assert abs(diff.mean()) < 4 * diff.std() / 7**0.5
    amortization = gaps.amortization_gap
    assert amortization.mean() > -4 * amortization.std() / 7**0.5


def test_flow_covers_both_modes_of_the_bimodal_posterior():
    """A fitted flow q covers both modes and its KL to p(z|x) is far below a one-mode Gaussian's log 2."""
    torch.set_default_dtype(torch.float64)
    try:
        model = Bimodal(noise_std=0.5)
        x = torch.tensor([[2.0]])
        flow = fit_flow_posterior(model.log_joint, x, 1, steps=600, k=64, seed=0)
        with torch.no_grad():
            z, log_q = flow(x).rsample_and_log_prob((20_000,))  # (n, 1, 1), (n, 1)
        right = (z > 0).double().mean()
        assert 0.25 < right < 0.75
        log_w = model.log_joint(x, z) - log_q  # (n, 1)
        kl = model.log_marginal(x) - log_w.mean(0)  # log p(x) - ELBO
        assert kl < 0.2 < math.log(2)
    finally:
        torch.set_default_dtype(torch.float32)


def test_fit_flow_posterior_checks_arguments():
    with pytest.raises(TypeError, match="log_joint"):
        fit_flow_posterior(None, torch.zeros(1, 1), 1)
    with pytest.raises(ValueError, match="x"):
        fit_flow_posterior(Bimodal().log_joint, torch.zeros(3), 1)
    with pytest.raises(ValueError, match="anneal"):
        fit_flow_posterior(Bimodal().log_joint, torch.zeros(1, 1), 1, anneal=1.5)


def test_gaussian_family_for_a_flow_encoder_starts_from_its_draws(flow_vae, x):
    """A flow has no closed-form mean: the Gaussian family starts from the moments of its draws."""
    q = optimize_posterior(flow_vae, x, family="gaussian", steps=5, seed=0)
    assert q.batch_shape == (7,) and q.event_shape == (3,)
    assert torch.isfinite(q.mean).all() and (q.stddev > 0).all()
