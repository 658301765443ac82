"""Gradient estimators of the IWAE bound: values, means against the reparameterized gradient, variances."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

import vaelib
from vaelib.estimators import gradient_samples, gradient_statistics
from vaelib.iwae_gradients import iwae_gradient_samples, iwae_surrogate


def _learnable(toy, toy_data, shift=0.3):
    """The toy with leaf W and b (decoder) and a diagonal q shifted off the posterior (encoder)."""
    model = vaelib.LinearGaussian(toy.W.clone().requires_grad_(), toy.b.clone().requires_grad_(), toy.noise_std)
    loc = (toy.posterior(toy_data).mean + shift).requires_grad_()
    log_scale = torch.full((toy_data.shape[0], toy.z_dim), -0.5, dtype=torch.float64, requires_grad=True)

    def encode(x):
        return Independent(Normal(loc, log_scale.exp()), 1)

    return model, encode, [loc, log_scale], [model.W, model.b]


def _z_scores(a, b):
    """Per-parameter difference of two Monte Carlo means in units of its standard error."""
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    diff = a.mean(0) - b.mean(0)
    # A parameter whose gradient is the same number in every draw (se = 0) must agree exactly.
    exact = torch.where(diff == 0, 0.0, torch.inf)
    return torch.where(se > 0, diff / se.clamp_min(1e-300), exact)


@pytest.mark.parametrize("estimator", ["reparam", "stl", "dreg"])
def test_value_is_the_iwae_bound(toy, toy_data, estimator):
    """Every surrogate's value is the IWAE bound of the same draws."""
    model, encode, _, _ = _learnable(toy, toy_data)
    torch.manual_seed(1)
    value = iwae_surrogate(toy_data, encode(toy_data), model, 7, estimator=estimator)
    torch.manual_seed(1)
    log_w = vaelib.log_weights(toy_data, encode(toy_data), model.log_joint, 7)
    assert torch.allclose(value, vaelib.iwae_from_log_weights(log_w), atol=1e-12)


@pytest.mark.parametrize(("estimator", "k"), [("stl", 1), ("dreg", 1), ("dreg", 10)])
def test_encoder_gradient_unbiased_linear_gaussian(toy, toy_data, estimator, k):
    """STL (k = 1) and DReG (any k) have the reparameterized encoder gradient's mean, within 4.5 SE."""
    model, encode, enc, _ = _learnable(toy, toy_data)
    ref = iwae_gradient_samples(toy_data, encode, model, enc, estimator="reparam", n=2000, k=k)
    new = iwae_gradient_samples(toy_data, encode, model, enc, estimator=estimator, n=2000, k=k)
    assert float(_z_scores(new, ref).abs().max()) < 4.5


def test_stl_encoder_gradient_biased_for_k_above_one(toy, toy_data):
    """For k > 1 the term STL drops does not average to zero (Tucker et al. 2018): its mean is off."""
    model, encode, enc, _ = _learnable(toy, toy_data)
    ref = iwae_gradient_samples(toy_data, encode, model, enc, estimator="dreg", n=1000, k=10)
    stl = iwae_gradient_samples(toy_data, encode, model, enc, estimator="stl", n=1000, k=10)
    assert float(_z_scores(stl, ref).abs().max()) > 8


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_decoder_gradient_unchanged_linear_gaussian(toy, toy_data, estimator):
    """For the decoder STL and DReG are the IWAE gradient itself: same draws, same numbers."""
    model, encode, _, dec = _learnable(toy, toy_data)
    torch.manual_seed(4)
    ref = iwae_gradient_samples(toy_data, encode, model, dec, estimator="reparam", n=50, k=10)
    torch.manual_seed(4)
    new = iwae_gradient_samples(toy_data, encode, model, dec, estimator=estimator, n=50, k=10)
    assert torch.allclose(new, ref, atol=1e-10)


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_unbiased_on_a_small_vae(estimator):
    """On a small VAE, the encoder's (DReG; STL at k = 1) and decoder's mean gradients match reparam, 4.5 SE."""
    torch.manual_seed(0)
    vae = vaelib.VAE.mlp(x_dim=6, z_dim=2, hidden=(5,)).double()
    x = torch.bernoulli(torch.full((3, 6), 0.4, dtype=torch.float64))
    k = 1 if estimator == "stl" else 8
    params = list(vae.parameters())
    ref = iwae_gradient_samples(x, vae.encode, vae, params, estimator="reparam", n=2000, k=k)
    new = iwae_gradient_samples(x, vae.encode, vae, params, estimator=estimator, n=2000, k=k)
    z = _z_scores(new, ref)
    n_enc = sum(p.numel() for p in vae.encoder.parameters())
    assert float(z[:n_enc].abs().max()) < 4.5  # encoder
    assert float(z[n_enc:].abs().max()) < 4.5  # decoder
    assert float(ref[:, n_enc:].var(0).sum()) > 0  # the decoder's gradients are random, not trivially equal


def test_variance_lower_near_the_posterior(toy, toy_data):
    """Near the posterior STL's and DReG's encoder gradients are far less noisy than reparam's (k = 1)."""
    model, encode, enc, _ = _learnable(toy, toy_data, shift=0.1)
    var = {
        e: iwae_gradient_samples(toy_data, encode, model, enc, estimator=e, n=500, k=1).var(0).sum()
        for e in ("reparam", "stl", "dreg")
    }
    assert var["stl"] < 0.5 * var["reparam"]
    assert var["dreg"] < 0.5 * var["reparam"]


def test_dreg_variance_falls_with_k(toy, toy_data):
    """DReG's encoder variance relative to reparam's shrinks as k grows (Tucker et al. 2018, figure 1)."""
    model, encode, enc, _ = _learnable(toy, toy_data)
    ratio = {}
    for k in (1, 100):
        ref = iwae_gradient_samples(toy_data, encode, model, enc, estimator="reparam", n=500, k=k)
        new = iwae_gradient_samples(toy_data, encode, model, enc, estimator="dreg", n=500, k=k)
        ratio[k] = float(new.var(0).sum() / ref.var(0).sum())
    assert ratio[100] < 0.1 * ratio[1]


def test_stl_and_dreg_zero_at_the_exact_posterior(toy, toy_data):
    """With q the exact posterior, log w is constant in z: every STL and DReG encoder draw is zero; reparam's is not."""
    post = toy.posterior(toy_data)
    loc = post.mean.clone().requires_grad_()
    tril = post.scale_tril.clone().requires_grad_()

    def encode(x):
        return MultivariateNormal(loc, scale_tril=tril)

    for estimator in ("stl", "dreg"):
        g = iwae_gradient_samples(toy_data, encode, toy, [loc, tril], estimator=estimator, n=20, k=5)
        assert float(g.abs().max()) < 1e-10, estimator
    g = iwae_gradient_samples(toy_data, encode, toy, [loc, tril], estimator="reparam", n=20, k=5)
    assert float(g.abs().max()) > 1e-2


def test_gradient_statistics():
    """Mean, unbiased variance and the bias-corrected SNR sqrt(mean^2 - var / n) / std, per parameter."""
    g = torch.tensor([[1.0, -2.0], [3.0, -2.0], [2.0, -5.0]], dtype=torch.float64)
    stats = gradient_statistics(g)
    assert torch.allclose(stats.mean, torch.tensor([2.0, -3.0], dtype=torch.float64))
    assert torch.allclose(stats.variance, torch.tensor([1.0, 3.0], dtype=torch.float64))
    expected = torch.tensor([(4.0 - 1.0 / 3) ** 0.5, ((9.0 - 1.0) / 3.0) ** 0.5], dtype=torch.float64)
    assert torch.allclose(stats.snr, expected)
    assert stats.n == 3
    with pytest.raises(ValueError, match="grads"):
        gradient_statistics(g[:1])


def test_objective_backward_reaches_every_parameter():
    """vaelib.IWAE(k, estimator) is (vae, x) -> (batch,) with gradients for encoder and decoder."""
    vae = vaelib.VAE.mlp(x_dim=6, z_dim=2, hidden=(5,)).double()
    x = torch.bernoulli(torch.full((4, 6), 0.5, dtype=torch.float64))
    value = vaelib.IWAE(k=4, estimator="dreg")(vae, x)
    assert value.shape == (4,)
    value.sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in vae.parameters())


def test_bad_arguments(toy, toy_data):
    """Unknown estimators, q without detachable parameters and parameters without gradients are refused."""
    q = Independent(Normal(torch.zeros(toy_data.shape[0], toy.z_dim, dtype=torch.float64), 1.0), 1)
    with pytest.raises(ValueError, match="estimator: expected one of"):
        iwae_surrogate(toy_data, q, toy, 3, estimator="vimco")
    with pytest.raises(TypeError, match="q: expected"):
        iwae_surrogate(toy_data, torch.distributions.Uniform(0.0, 1.0), toy, 3, estimator="stl")
    with pytest.raises(ValueError, match="params"):
        iwae_gradient_samples(toy_data, lambda x: q, toy, [toy.W], estimator="dreg", n=2)
    with pytest.raises(ValueError, match="k"):
        vaelib.IWAE(k=0)


def test_gradient_samples_takes_an_iwae_surrogate(toy, toy_data):
    """gradient_samples(batched=True) with an IWAE surrogate draws the same distribution as the loop here."""
    model, _, enc, _ = _learnable(toy, toy_data)
    x, loc, log_scale = toy_data[:1], enc[0][:1].detach(), enc[1][:1].detach()
    loc.requires_grad_(), log_scale.requires_grad_()

    def make_q(loc, log_scale):
        return Independent(Normal(loc, log_scale.exp()), 1)

    dreg = functools.partial(iwae_surrogate, estimator="dreg")
    batched = gradient_samples(x, [loc, log_scale], make_q, model, estimator=dreg, n=4000, k=10, batched=True)
    loop = iwae_gradient_samples(
        x, lambda x: make_q(loc, log_scale), model, [loc, log_scale], estimator="reparam", n=2000, k=10
    )
    assert batched.shape == (4000, 2 * toy.z_dim)
    assert float(_z_scores(batched, loop).abs().max()) < 4.5
