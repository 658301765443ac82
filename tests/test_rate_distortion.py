"""vaelib.rate_distortion: rate and distortion, the beta objective, free bits, KL warm-up, and fit's options."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.distributions import Distribution, TransformedDistribution, kl_divergence

import vaelib
from vaelib.rate_distortion import beta_elbo, kl_warmup, rate_distortion

OPTIONS = {"device": "cpu", "progress": False, "batch_size": 50}


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return vaelib.data.load_digits()[0][:300]


@pytest.fixture
def lg() -> tuple[vaelib.VAE, vaelib.LinearGaussian, torch.Tensor]:
    """A VAE on the linear-Gaussian model (1-d latent) with a poorer encoder, the model, and 5 data points."""
    toy = vaelib.LinearGaussian.random(x_dim=3, z_dim=1, noise_std=0.5, seed=1)
    x, _ = toy.sample(5, generator=torch.Generator().manual_seed(2))
    return vaelib.toy.linear_gaussian_vae(toy, mean_factor=0.7, scale_factor=1.4), toy, x


def tiny(seed: int = 0, z_dim: int = 2, hidden: tuple[int, ...] = (16,)) -> vaelib.VAE:
    torch.manual_seed(seed)
    return vaelib.VAE.mlp(64, z_dim, hidden=hidden)


def weights(vae: vaelib.VAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass
class ExactPosterior:
    """The linear-Gaussian model with its exact (full-covariance) posterior as encoder."""

    toy: vaelib.LinearGaussian
    flow_like: bool = False  # hide q's type, so that torch has no closed-form KL for it

    @property
    def prior(self) -> Distribution:
        return self.toy.prior

    def encode(self, x: torch.Tensor) -> Distribution:
        q = self.toy.posterior(x)
        return TransformedDistribution(q, []) if self.flow_like else q

    def decode(self, z: torch.Tensor) -> Distribution:
        return self.toy.likelihood(z)


def test_rate_is_the_closed_form_kl(lg):
    """R(x) equals 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) for the diagonal Gaussian q (float64)."""
    vae, _, toy_data = lg
    with torch.no_grad():
        q = vae.encode(toy_data)
        mu, var = q.mean, q.variance  # (5, 1) each
        by_hand = 0.5 * (mu**2 + var - 1 - var.log()).sum(-1)  # (5,)
        rd = rate_distortion(vae, toy_data, k=3, seed=0)
    assert rd.rate.dtype == torch.float64
    assert torch.allclose(rd.rate, by_hand, atol=1e-12)


def test_same_draws_give_the_elbo_exactly(lg):
    """With the Monte Carlo rate, -(R + D) is the mean log weight of the same draws."""
    vae, _, toy_data = lg
    with torch.no_grad():
        rd = rate_distortion(vae, toy_data, k=50, seed=3, analytic_kl=False)
        log_w = vae.log_weights(toy_data, k=50, seed=3)  # (50, 5)
    assert torch.allclose(rd.elbo, log_w.mean(0), atol=1e-10)


def test_rate_plus_distortion_is_minus_the_closed_form_elbo(lg):
    """R + D matches -ELBO of the linear-Gaussian model in closed form, within 4 standard errors."""
    vae, toy, toy_data = lg
    with torch.no_grad():
        exact = toy.elbo(toy_data, vae.encode(toy_data))  # (5,)
        draws = torch.stack([rate_distortion(vae, toy_data, seed=s).elbo for s in range(4000)])  # (4000, 5)
    se = draws.std(0) / draws.shape[0] ** 0.5
    assert ((draws.mean(0) - exact).abs() < 4 * se).all()
    assert (se > 0).all()


def test_monte_carlo_rate_agrees_with_the_closed_form(lg):
    """The Monte Carlo rate, log q(z|x) - log p(z), averages to kl_divergence(q, p)."""
    vae, _, toy_data = lg
    with torch.no_grad():
        exact = kl_divergence(vae.encode(toy_data), vae.prior)  # (5,)
        draws = torch.stack(
            [rate_distortion(vae, toy_data, seed=s, analytic_kl=False).rate for s in range(4000)]
        )  # (4000, 5)
    se = draws.std(0) / draws.shape[0] ** 0.5
    assert ((draws.mean(0) - exact).abs() < 4 * se).all()


def test_a_posterior_without_closed_form_kl_uses_monte_carlo(toy, toy_data):
    """For q with no registered KL (as a flow), R is Monte Carlo; with q the exact posterior -(R + D) = log p(x)."""
    model = ExactPosterior(toy, flow_like=True)
    exact = toy.log_marginal(toy_data)
    rd = rate_distortion(model, toy_data, k=7, seed=1)
    assert torch.allclose(rd.elbo, exact, atol=1e-10)
    with pytest.raises(ValueError, match="analytic_kl: torch has no closed-form KL"):
        rate_distortion(model, toy_data, analytic_kl=True)
    # the full-covariance posterior has a closed form: the rate is KL(p(z|x) || p(z)) exactly
    rd = rate_distortion(ExactPosterior(toy), toy_data, k=7, seed=1)
    assert torch.allclose(rd.rate, kl_divergence(toy.posterior(toy_data), toy.prior), atol=1e-12)


def test_bits_are_nats_over_ln2(lg):
    """bits=True divides both terms by ln 2; the means come with standard errors."""
    vae, _, toy_data = lg
    with torch.no_grad():
        nats = rate_distortion(vae, toy_data, k=4, seed=2)
        bits = rate_distortion(vae, toy_data, k=4, seed=2, bits=True)
    assert bits.unit == "bits"
    assert torch.allclose(bits.rate * math.log(2), nats.rate, atol=1e-12)
    assert torch.allclose(bits.distortion * math.log(2), nats.distortion, atol=1e-12)
    summary = nats.mean()
    assert summary["rate_se"] == pytest.approx(float(nats.rate.std() / 5**0.5))


def test_beta_objective_weights_the_rate(lg):
    """beta_elbo is -(D + beta R) from the same draws: its change with beta is exactly the rate."""
    vae, _, toy_data = lg
    with torch.no_grad():
        rd = rate_distortion(vae, toy_data, k=5, seed=4)
        torch.manual_seed(4)
        b1 = beta_elbo(vae, toy_data, 1.0, k=5)
        torch.manual_seed(4)
        b3 = beta_elbo(vae, toy_data, 3.0, k=5)
    assert torch.allclose(b1, rd.elbo, atol=1e-12)
    assert torch.allclose(b1 - b3, 2.0 * rd.rate, atol=1e-12)


def test_free_bits_stop_the_gradient_of_a_dimension_under_the_floor():
    """A latent dimension whose batch-average KL is below lambda gets the distortion's gradient only."""
    torch.manual_seed(0)
    encoder = nn.Linear(3, 4, dtype=torch.float64)  # z_dim = 2: means, then raw scales
    with torch.no_grad():
        encoder.weight.zero_()
        encoder.bias.copy_(torch.tensor([0.1, 2.0, 0.5, 0.5], dtype=torch.float64))  # KL_1 small, KL_2 about 2
    decoder = nn.Linear(2, 6, dtype=torch.float64)
    vae = vaelib.VAE(encoder, decoder, x_dim=3, z_dim=2, likelihood="gaussian")
    x = torch.randn(10, 3, dtype=torch.float64)
    with torch.no_grad():
        kl = kl_divergence(vae.encode(x).base_dist, vae.prior.base_dist).mean(0)  # (2,)
    lam = 0.5
    assert kl[0] < lam < kl[1]

    def grad(fn) -> torch.Tensor:
        encoder.zero_grad()
        torch.manual_seed(5)
        fn().sum().backward()
        return encoder.bias.grad.clone()

    free = grad(lambda: beta_elbo(vae, x, 2.0, free_bits=lam))
    distortion_only = grad(lambda: -rate_distortion(vae, x).distortion)
    plain = grad(lambda: beta_elbo(vae, x, 2.0))
    # dimension 1 (mean 0, raw scale 2): under the floor, only the distortion pulls it
    assert torch.allclose(free[[0, 2]], distortion_only[[0, 2]], atol=1e-12)
    assert not torch.allclose(plain[[0, 2]], distortion_only[[0, 2]], atol=1e-6)
    # dimension 2: above the floor, the full beta objective
    assert torch.allclose(free[[1, 3]], plain[[1, 3]], atol=1e-12)
    # and the value: the rate of dimension 1 is replaced by lambda for every point
    with torch.no_grad():
        torch.manual_seed(6)
        value = beta_elbo(vae, x, 2.0, free_bits=lam)
        rd = rate_distortion(vae, x, seed=6)
        kl_point = kl_divergence(vae.encode(x).base_dist, vae.prior.base_dist)  # (10, 2)
    assert torch.allclose(value, -(rd.distortion + 2.0 * (lam + kl_point[:, 1])), atol=1e-12)


def test_warmup_weights_rise_linearly_per_epoch():
    """kl_warmup(4, beta=2) gives 0, 0.5, 1, 1.5 in epochs 1-4, then 2; kl_warmup(0) is beta throughout."""
    w = kl_warmup(4, beta=2.0)
    assert [w(e) for e in range(1, 8)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert [kl_warmup(0, beta=3.0)(e) for e in (1, 2)] == [3.0, 3.0]


def test_fit_asks_the_schedule_once_per_epoch(tmp_path, digits):
    """fit sets the weight before each epoch, from epoch 1, and a resumed run continues the count."""
    asked = []

    def schedule(epoch: int) -> float:
        asked.append(epoch)
        return 1.0

    path = tmp_path / "run.pt"
    vaelib.fit(tiny(), digits, objective=vaelib.BetaELBO(schedule=schedule), epochs=2, checkpoint=path, **OPTIONS)
    assert asked[:2] == [1, 2]
    asked.clear()
    vaelib.fit(
        tiny(),
        digits,
        objective=vaelib.BetaELBO(schedule=schedule),
        epochs=3,
        checkpoint=path,
        if_exists="resume",
        **OPTIONS,
    )
    assert asked[0] == 3


def test_default_options_train_as_before(digits):
    """BetaELBO at beta=1, no warm-up and no free bits is the ELBO with the KL in closed form, bitwise;
    so is a schedule of constant weight 1."""
    a, b, c, d = tiny(), tiny(), tiny(), tiny()
    ha = vaelib.fit(a, digits, objective=vaelib.ELBO(analytic_kl=True), epochs=2, **OPTIONS)
    hb = vaelib.fit(b, digits, objective=vaelib.BetaELBO(beta=1.0, warmup_epochs=0, free_bits=0.0), epochs=2, **OPTIONS)
    hc = vaelib.fit(c, digits, objective=vaelib.BetaELBO(schedule=lambda epoch: 1.0), epochs=2, **OPTIONS)
    hd = vaelib.fit(d, digits, epochs=2, objective=vaelib.BetaELBO(), **OPTIONS)
    for other, history in ((b, hb), (c, hc), (d, hd)):
        assert same(weights(a), weights(other))
        assert ha.train_bound == history.train_bound


def test_warmup_starts_as_an_autoencoder(digits):
    """The first warm-up epoch trains with weight 0: bitwise the same as beta=0 for one epoch."""
    a, b, c = tiny(), tiny(), tiny()
    vaelib.fit(a, digits, objective=vaelib.BetaELBO(warmup_epochs=3), epochs=1, **OPTIONS)
    vaelib.fit(b, digits, objective=vaelib.BetaELBO(beta=0.0), epochs=1, **OPTIONS)
    vaelib.fit(c, digits, epochs=1, **OPTIONS)
    assert same(weights(a), weights(b))
    assert not same(weights(a), weights(c))


def test_large_beta_collapses_and_free_bits_keep_the_floor(digits):
    """beta=8 drives the rate to ~0 and every unit inactive; free bits of 0.5 nats keep R near z_dim * 0.5."""
    x = vaelib.data.binarize(digits, generator=torch.Generator().manual_seed(0))
    z_dim, lam = 4, 0.5
    collapsed, kept = tiny(z_dim=z_dim, hidden=(64,)), tiny(z_dim=z_dim, hidden=(64,))
    vaelib.fit(collapsed, digits, objective=vaelib.BetaELBO(beta=8.0), epochs=25, **OPTIONS)
    vaelib.fit(kept, digits, objective=vaelib.BetaELBO(beta=8.0, free_bits=lam), epochs=25, **OPTIONS)
    with torch.no_grad():
        r_collapsed = rate_distortion(collapsed, x, seed=0).rate
        r_kept = rate_distortion(kept, x, seed=0).rate
    assert vaelib.active_units(collapsed, x) == 0
    assert r_collapsed.mean() < 0.05
    assert vaelib.active_units(kept, x) > 0
    assert r_kept.mean() - 4 * r_kept.std() / len(r_kept) ** 0.5 > 0.5 * z_dim * lam


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"beta": -1.0}, ValueError, "beta: expected a finite number >= 0"),
        ({"beta": float("nan")}, TypeError, "beta: expected a finite number >= 0"),
        ({"free_bits": -0.1}, ValueError, "free_bits: expected a finite number >= 0"),
        ({"warmup_epochs": -1}, ValueError, "warmup_epochs: expected an integer >= 0"),
        ({"schedule": 3}, TypeError, "schedule: expected a function"),
        ({"schedule": lambda e: 1.0, "beta": 2.0}, ValueError, "schedule: gives the KL weight"),
    ],
)
def test_bad_options_are_refused(kwargs, error, message):
    """Each bad field of BetaELBO raises where it is written, naming the field."""
    with pytest.raises(error, match=message):
        vaelib.BetaELBO(**kwargs)


def test_a_schedule_returning_a_negative_weight_is_named(digits):
    """A schedule's bad value is refused with the epoch it came from."""
    with pytest.raises(ValueError, match="schedule \\(its value at epoch 1\\)"):
        vaelib.fit(tiny(), digits, objective=vaelib.BetaELBO(schedule=lambda e: -1.0), epochs=1, **OPTIONS)


def test_resume_refuses_another_beta(tmp_path, digits):
    """beta is part of the run's settings: resuming with another value is refused, the same value resumes."""
    path = tmp_path / "run.pt"
    vaelib.fit(tiny(), digits, objective=vaelib.BetaELBO(beta=2.0), epochs=1, checkpoint=path, **OPTIONS)

    def resume(beta: float):
        objective = vaelib.BetaELBO(beta=beta)
        return vaelib.fit(tiny(), digits, objective=objective, epochs=2, checkpoint=path, if_exists="resume", **OPTIONS)

    with pytest.raises(vaelib.CheckpointError, match="beta"):
        resume(3.0)
    assert len(resume(2.0)) == 2
