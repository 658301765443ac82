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


def test_signal_to_noise_agrees_with_its_gram_form_and_with_repeated_rows():
    """The same SNR from the draws, from their Gram matrix, and with counts standing for repeated rows."""
    g = torch.randn(30, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.4
    counts = torch.bincount(torch.randint(30, (30,), generator=torch.Generator().manual_seed(1)), minlength=30)
    repeated = g.repeat_interleave(counts, dim=0)
    snr = vaelib.estimators.signal_to_noise
    assert torch.allclose(snr(g), vaelib.estimators.signal_to_noise_from_gram(g @ g.T), atol=1e-12)
    assert torch.allclose(snr(g, counts), vaelib.estimators.signal_to_noise_from_gram(g @ g.T, counts), atol=1e-12)
    assert torch.allclose(snr(g, counts), snr(repeated), atol=1e-12)
    per_parameter = vaelib.estimators.gradient_statistics(g).snr
    assert torch.allclose(per_parameter[2], snr(g[:, 2:3]), atol=1e-12)


def test_signal_to_noise_is_unbiased_for_its_square_where_the_plain_ratio_is_not():
    """Draws g ~ N(mu, s^2 I) in d = 50 dimensions: SNR^2 = |mu|^2 / (d s^2) = 0.02.

    The corrected estimate of SNR^2 averages to it within 4 standard errors over 400 sets of
    20 draws; the uncorrected |g_bar|^2 / (d s_hat^2) sits 1 / n = 0.05 above it.
    """
    gen = torch.Generator().manual_seed(5)
    d, n, sets = 50, 20, 400
    mu = torch.full((d,), 0.1, dtype=torch.float64)  # |mu|^2 = 0.5, d s^2 = 50 * 0.5 = 25
    draws = mu + 0.5**0.5 * torch.randn(sets, n, d, generator=gen, dtype=torch.float64)
    truth = float(mu.pow(2).sum() / (d * 0.5))
    corrected = torch.stack([vaelib.estimators.signal_to_noise(g) ** 2 for g in draws])
    plain = torch.stack([g.mean(0).pow(2).sum() / g.var(0).sum() for g in draws])
    se = float(corrected.std() / sets**0.5)
    assert abs(float(corrected.mean()) - truth) < 4 * se + 0.01  # the clamp at 0 adds a little
    assert float(plain.mean()) - truth > 0.04


def _score_with(baseline):
    """The score estimator with ``baseline`` as a surrogate for gradient_samples; a per-point tensor is
    repeated to the batched copies of the data (gradient_samples stacks them as x.repeat(n, 1))."""

    def surrogate(x, q, model, k):
        b = baseline.repeat(x.shape[0] // baseline.numel()) if isinstance(baseline, torch.Tensor) else baseline
        return elbo_surrogate(x, q, model, k, estimator="score", baseline=b)

    return surrogate


def test_baseline_one_is_the_surrogate_that_keeps_grad_f(toy, toy_data):
    """baseline=1.0 is, draw by draw, the surrogate f + stop(f) (log q - stop(log q)) (vaelib's before the
    baseline, Pyro's form), whose gradient grad f + f grad log q keeps the pathwise term grad f = -grad log q."""
    (loc, log_scale), make_q, _ = _setup(toy, toy_data)
    torch.manual_seed(3)
    q = make_q(loc, log_scale)
    z = q.sample((4,))  # (4, batch, z_dim)
    log_q = q.log_prob(z)
    f = toy.log_joint(toy_data, z) - log_q
    old = (f + f.detach() * (log_q - log_q.detach())).mean(dim=0)
    torch.manual_seed(3)
    new = elbo_surrogate(toy_data, make_q(loc, log_scale), toy, k=4, estimator="score", baseline=1.0)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-12)
    params = [loc, log_scale]
    for a, b in zip(torch.autograd.grad(old.sum(), params), torch.autograd.grad(new.sum(), params), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("baseline", [None, 1.0, -4.0, "per point"])
def test_score_estimator_is_unbiased_for_every_baseline(toy, toy_data, baseline):
    """With no baseline, a number or one number per data point, the mean gradient is the exact one (4 SE)."""
    params, make_q, exact = _setup(toy, toy_data)
    if baseline == "per point":
        baseline = torch.linspace(-8.0, 2.0, toy_data.shape[0], dtype=torch.float64)
    grads = gradient_samples(toy_data, params, make_q, toy, estimator=_score_with(baseline), n=4000, batched=True)
    se = grads.std(0) / grads.shape[0] ** 0.5
    assert bool(((grads.mean(0) - exact).abs() <= 4 * se).all())


def test_a_baseline_changes_the_variance_not_the_mean(toy, toy_data):
    """Under one seed a baseline b moves each draw by exactly -b grad log q (autograd on log q at the same z);
    that score has mean zero and E|s|^2 = sum_j (1 / s_j^2 + 2), the Fisher information of (loc, log scale),
    so the mean stays; b = ELBO cuts the total variance by more than 4 standard errors."""
    params, make_q, exact = _setup(toy, toy_data)
    z_dim, n = toy.z_dim, 4000
    b = toy.elbo(toy_data, make_q(*params)).detach()  # (batch,): the exact ELBO of each point
    grads = {}
    for name, surrogate in [("none", _score_with(None)), ("elbo", _score_with(b)), ("score", _log_q)]:
        torch.manual_seed(7)
        grads[name] = gradient_samples(toy_data, params, make_q, toy, estimator=surrogate, n=n, batched=True)
    s = grads["score"]  # (n, n_params): grad log q at the draws of the other two
    per_column = b.repeat_interleave(z_dim).repeat(2)  # (n_params,): loc then log scale, point by point
    torch.testing.assert_close(grads["elbo"] - grads["none"], -per_column * s, rtol=0, atol=1e-10)
    assert bool((s.mean(0).abs() <= 4 * s.std(0) / n**0.5).all())
    sq = s.pow(2).sum(1)  # (n,): |s|^2
    fisher = ((-2 * params[1].detach()).exp() + 2).sum()
    assert abs(sq.mean() - fisher) < 4 * sq.std() / n**0.5
    spread = {name: ((g - g.mean(0)) ** 2).sum(1) for name, g in grads.items()}  # mean: total variance
    gap = spread["none"].mean() - spread["elbo"].mean()
    assert gap > 4 * ((spread["none"].var() + spread["elbo"].var()) / n) ** 0.5
    for g in (grads["none"], grads["elbo"]):
        assert bool(((g.mean(0) - exact).abs() <= 4 * g.std(0) / n**0.5).all())


def _log_q(x, q, model, k):
    """A surrogate whose gradient is grad log q at the draws the score surrogate makes under the same seed."""
    return q.log_prob(q.sample((k,))).mean(dim=0)


def test_the_baseline_leaves_the_decoder_gradient_alone():
    """For a VAE the score surrogate's decoder gradient is grad_theta log p(x, z) at its draws, whatever b."""
    vae = vaelib.VAE.mlp(x_dim=5, z_dim=2, hidden=(8,)).double()
    x = torch.bernoulli(torch.full((4, 5), 0.5, dtype=torch.float64))
    decoder = list(vae.decoder.parameters())
    torch.manual_seed(1)
    z = vae.encode(x).sample((3,))  # (3, batch, z_dim)
    pathwise = torch.autograd.grad(vae.log_joint(x, z).mean(0).sum(), decoder)
    for baseline in [None, 1.0, torch.arange(4, dtype=torch.float64)]:
        torch.manual_seed(1)
        surrogate = elbo_surrogate(x, vae.encode(x), vae, k=3, estimator="score", baseline=baseline)
        for a, b in zip(torch.autograd.grad(surrogate.sum(), decoder), pathwise, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_bad_baselines_are_refused(toy, toy_data):
    """A baseline for another estimator, of the wrong shape or type, or not finite, is refused before any work."""
    q = Independent(Normal(torch.zeros(toy_data.shape[0], toy.z_dim, dtype=torch.float64), 1.0), 1)
    cases = [
        ({"estimator": "reparam", "baseline": 1.0}, ValueError, "only estimator='score'"),
        ({"estimator": "score", "baseline": torch.zeros(3)}, ValueError, r"shape \(\) or \(5,\)"),
        ({"estimator": "score", "baseline": float("nan")}, ValueError, "finite"),
        ({"estimator": "score", "baseline": torch.tensor([0.0, 1, 2, 3, float("inf")])}, ValueError, "finite"),
        ({"estimator": "score", "baseline": True}, TypeError, "got bool"),
        ({"estimator": "score", "baseline": "elbo"}, TypeError, "got str"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            elbo_surrogate(toy_data, q, toy, **kwargs)
