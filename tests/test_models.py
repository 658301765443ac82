"""The VAE: distributions, bounds, shapes, dtype and device following."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

import vaelib
from vaelib.models import NetworkShapeError


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


OPTIONS = {"device": "cpu", "progress": False, "batch_size": 50}


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    train, test = vaelib.data.load_digits()
    return train.reshape(-1, 1, 8, 8), test.reshape(-1, 1, 8, 8)  # (n, 1, 8, 8)


def conv_networks(z_dim: int = 4) -> tuple[nn.Module, nn.Module]:
    """An ordinary conv encoder and decoder, as in a plain PyTorch training loop."""
    encoder = nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1),  # (b, 16, 4, 4)
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 2 * z_dim),
    )
    decoder = nn.Sequential(
        nn.Linear(z_dim, 16 * 4 * 4),
        nn.ReLU(),
        nn.Unflatten(1, (16, 4, 4)),
        nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1),  # (N, 1, 8, 8)
    )
    return encoder, decoder


class ShapeRecorder(nn.Module):
    """Wraps a network and notes the shapes of its inputs."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.net(x)


def test_unchanged_conv_networks_train_on_images(images):
    """A conv VAE from plain nn modules trains on (n, 1, 8, 8) digits and is scored by log_likelihood."""
    train, test = images
    torch.manual_seed(0)
    vae = vaelib.VAE(*conv_networks(), x_shape=(1, 8, 8), z_dim=4)
    history = vaelib.fit(vae, train, valid_x=test, epochs=5, lr=3e-3, **OPTIONS)
    assert history.train_bound[-1] > history.train_bound[0] + 5
    x = vaelib.data.binarize(test[:20], generator=torch.Generator().manual_seed(0))
    ll = vaelib.log_likelihood(vae, x, k=100, progress=False)
    assert ll.shape == (20,) and torch.isfinite(ll).all()
    assert vae.sample(3).shape == (3, 1, 8, 8)


def test_image_shape_equals_flat_data_exactly():
    """The same MLP, once on flat (n, 64) data and once wrapped for (n, 1, 8, 8) images, gives equal
    ELBO and IWAE values under one seed: folding and the sum over the event dimensions are right."""
    for likelihood, decoder_shape in (("bernoulli", (1, 8, 8)), ("gaussian", (2, 8, 8))):
        torch.manual_seed(1)
        flat = vaelib.VAE.mlp(64, 3, hidden=(16,), likelihood=likelihood).double()
        wrapped = vaelib.VAE(
            nn.Sequential(nn.Flatten(), flat.encoder),
            nn.Sequential(flat.decoder, nn.Unflatten(1, decoder_shape)),  # means, then raw scales
            x_shape=(1, 8, 8),
            z_dim=3,
            likelihood=likelihood,
        )
        x = torch.rand(5, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64).round()
        for fn in ("elbo", "iwae"):
            torch.manual_seed(3)
            a = getattr(flat, fn)(x, k=7)
            torch.manual_seed(3)
            b = getattr(wrapped, fn)(x.reshape(5, 1, 8, 8), k=7)
            assert a.shape == b.shape == (5,)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_decoder_sees_the_samples_folded_into_the_batch(images):
    """With k = 6 and a batch of 10, the encoder sees (10, 1, 8, 8) and the decoder (60, z_dim)."""
    encoder, decoder = conv_networks()
    encoder, decoder = ShapeRecorder(encoder), ShapeRecorder(decoder)
    vae = vaelib.VAE(encoder, decoder, x_shape=(1, 8, 8), z_dim=4)
    encoder.shapes.clear()
    decoder.shapes.clear()
    vae.iwae(images[0][:10].round(), k=6)
    assert encoder.shapes == [(10, 1, 8, 8)] and decoder.shapes == [(60, 4)]


@pytest.mark.parametrize(
    ("encoder", "decoder", "message"),
    [
        (
            nn.Linear(64, 5),
            nn.Linear(4, 64),
            r"encoder: for input of shape \(2, 64\) expected output of shape "
            r"\(2, 8\), got \(2, 5\)",
        ),
        (
            nn.Linear(64, 8),
            nn.Linear(4, 60),
            r"decoder: for input of shape \(2, 4\) expected output of shape "
            r"\(2, 64\), got \(2, 60\)",
        ),
    ],
)
def test_networks_of_the_wrong_shape_are_named(encoder, decoder, message):
    """A dry run at construction raises NetworkShapeError naming the network, the expected and received shape."""
    with pytest.raises(NetworkShapeError, match=message):
        vaelib.VAE(encoder, decoder, x_dim=64, z_dim=4)


def test_gaussian_decoder_must_double_the_first_dimension():
    """A Gaussian conv decoder of one channel for one-channel images is refused, with the rule in the message."""
    encoder, decoder = conv_networks()
    with pytest.raises(NetworkShapeError, match=r"expected output of shape \(2, 2, 8, 8\).*doubles the first"):
        vaelib.VAE(encoder, decoder, x_shape=(1, 8, 8), z_dim=4, likelihood="gaussian")


def test_x_shape_or_x_dim():
    """Exactly one of x_shape and x_dim; a flat x_shape is x_dim."""
    encoder, decoder = nn.Linear(64, 8), nn.Linear(4, 64)
    with pytest.raises(TypeError, match="x_shape: give exactly one"):
        vaelib.VAE(encoder, decoder, x_shape=(64,), x_dim=64, z_dim=4)
    with pytest.raises(TypeError, match="x_shape: give exactly one"):
        vaelib.VAE(encoder, decoder, z_dim=4)
    vae = vaelib.VAE(encoder, decoder, x_shape=(64,), z_dim=4)
    assert vae.x_shape == (64,) and vae.x_dim == 64


def test_data_of_the_wrong_shape_is_refused(images):
    """Flat data for an image model: the error names the argument and the model's x_shape."""
    vae = vaelib.VAE.conv((1, 8, 8), z_dim=4, channels=(8, 16))
    with pytest.raises(ValueError, match=r"train_x: expected a 4-d array of shape \(n, 1, 8, 8\)"):
        vaelib.fit(vae, images[0].reshape(-1, 64), epochs=1, **OPTIONS)
    with pytest.raises(ValueError, match=r"x: expected shape \(n, 1, 8, 8\) \(the model's x_shape\)"):
        vaelib.log_likelihood(vae, images[0].reshape(-1, 1, 4, 16), k=2, progress=False)


@pytest.mark.parametrize("x_shape", [(1, 28, 28), (1, 8, 8), (3, 8, 8)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_vae_conv_shapes(x_shape, likelihood):
    """VAE.conv builds networks of the right shapes for 28x28 and 8x8 images, one or three channels."""
    vae = vaelib.VAE.conv(x_shape, z_dim=5, channels=(4, 8), likelihood=likelihood)
    x = torch.rand(3, *x_shape).round()
    assert vae.elbo(x, k=2).shape == (3,)
    assert vae.encode(x).mean.shape == (3, 5)
    assert vae.sample(2).shape == (2, *x_shape)


def test_vae_conv_refuses_sizes_it_cannot_halve():
    """Three halvings of an 8x8 image leave 1x1; of 28x28 they do not divide: refused with the reason."""
    with pytest.raises(ValueError, match="x_shape: height and width must be divisible by 8"):
        vaelib.VAE.conv((1, 28, 28), z_dim=4, channels=(8, 16, 32))


def test_vae_conv_rebuilds_itself_from_a_file(tmp_path, images):
    """A saved conv VAE loads with its architecture and the same weights (and so the same bounds)."""
    torch.manual_seed(0)
    vae = vaelib.VAE.conv((1, 8, 8), z_dim=4, channels=(8, 16))
    vaelib.fit(vae, images[0], epochs=1, **OPTIONS)
    vaelib.save(vae, tmp_path / "conv.pt")
    loaded = vaelib.load(tmp_path / "conv.pt")
    assert loaded.config == vae.config and loaded.x_shape == (1, 8, 8)
    x = images[1][:10].round()
    torch.manual_seed(1)
    a = vae.elbo(x, k=3)
    torch.manual_seed(1)
    b = loaded.elbo(x, k=3)
    assert torch.equal(a, b)


def test_conv_training_resumes_exactly(tmp_path, images):
    """A conv VAE stopped after 1 epoch and resumed to 3 ends bitwise where a 3-epoch run ends; a model
    with other channels is refused by the checkpoint, naming the architecture."""
    train, test = images[0][:400], images[1][:50]
    options = {**OPTIONS, "valid_x": test, "scheduler": lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.7)}
    torch.manual_seed(0)
    full = vaelib.VAE.conv((1, 8, 8), z_dim=4, channels=(8, 16))
    vaelib.fit(full, train, epochs=3, **options)
    torch.manual_seed(0)
    part = vaelib.VAE.conv((1, 8, 8), z_dim=4, channels=(8, 16))
    vaelib.fit(part, train, epochs=1, checkpoint=tmp_path / "c.pt", **options)
    torch.manual_seed(0)
    resumed = vaelib.VAE.conv((1, 8, 8), z_dim=4, channels=(8, 16))
    vaelib.fit(resumed, train, epochs=3, checkpoint=tmp_path / "c.pt", if_exists="resume", **options)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())
    other = vaelib.VAE.conv((1, 8, 8), z_dim=4, channels=(8, 8))
    with pytest.raises(vaelib.CheckpointError, match="another architecture"):
        vaelib.fit(other, train, epochs=3, checkpoint=tmp_path / "c.pt", if_exists="resume", **options)


X_DIM = 64


def tiny(likelihood: str = "bernoulli", hidden: tuple[int, ...] = (8,), seed: int = 0, **kw) -> vaelib.VAE:
    torch.manual_seed(seed)
    return vaelib.VAE.mlp(X_DIM, 2, hidden=hidden, likelihood=likelihood, **kw)


def test_gaussian_decoder_variance_collapse_stays_finite():
    """A Gaussian decoder driven to zero variance: the scale floor keeps every bound finite."""
    vae = tiny("gaussian")
    last = vae.decoder[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias[:X_DIM] = 0.5  # the mean
        last.bias[X_DIM:] = -1e4  # softplus of this is 0 in float32: a zero standard deviation
    x = torch.full((20, X_DIM), 0.5)
    x[:, 0] = 0.0  # one pixel off the mean by 0.5, i.e. 500 floors
    scale = vae.decode(torch.zeros(1, 2)).base_dist.scale.detach()
    assert float(scale.min()) == pytest.approx(vaelib.models.MIN_DECODER_SCALE)
    for bound in (vae.elbo(x, k=3), vae.iwae(x, k=8), vae.elbo(x, analytic_kl=True)):
        assert torch.isfinite(bound).all()
    # And training on data with constant pixels, which pulls the variance down, stays finite.
    history = vaelib.fit(tiny("gaussian"), x, epochs=20, batch_size=20, lr=0.05, device="cpu", progress=False)
    assert all(math.isfinite(b) for b in history.train_bound)


@pytest.mark.parametrize("method", ["elbo", "iwae"])
def test_bounds_refuse_data_of_another_dtype(method):
    vae = tiny()
    with pytest.raises(TypeError, match=r"^x: expected torch\.float32 data \(the model's dtype\), got torch\.float64"):
        getattr(vae, method)(torch.rand(3, X_DIM, dtype=torch.float64), k=2)
