"""Data of any event shape: convolutional networks used unchanged, folding of the k samples, shape errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vaelib
from vaelib.models import NetworkShapeError

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


class ShapeRecorder(nn.Module):
    """Wraps a network and notes the shapes of its inputs."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.net(x)


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
    vaelib.fit(resumed, train, epochs=3, checkpoint=tmp_path / "c.pt", resume=True, **options)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())
    other = vaelib.VAE.conv((1, 8, 8), z_dim=4, channels=(8, 8))
    with pytest.raises(vaelib.CheckpointError, match="another architecture"):
        vaelib.fit(other, train, epochs=3, checkpoint=tmp_path / "c.pt", resume=True, **options)
