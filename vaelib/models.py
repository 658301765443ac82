"""The variational autoencoder: a Gaussian encoder, a decoder, a standard normal prior.

.. math::

    p(z) = \\mathcal{N}(0, I), \\quad
    p_\\theta(x \\mid z) = \\text{Bernoulli or Gaussian}(\\text{decoder}_\\theta(z)), \\quad
    q_\\phi(z \\mid x) = \\mathcal{N}\\big(\\mu_\\phi(x), \\operatorname{diag} \\sigma^2_\\phi(x)\\big).

The distributions are built with ``validate_args=False``: their argument checks
read values back to the host, which would stall a GPU on every training step;
vaelib checks its inputs once, up front, instead.

Reference: Kingma and Welling (2013), "Auto-Encoding Variational Bayes", and
Kingma and Welling (2019), "An Introduction to Variational Autoencoders".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from vaelib._checks import LIKELIHOODS, check_choice, check_positive_int
from vaelib.bounds import elbo_from_log_weights, iwae_from_log_weights, log_weights
from vaelib.toy import LinearGaussian

__all__ = ["VAE", "ConvConfig", "MLPConfig", "NetworkShapeError"]

Likelihood = Literal["bernoulli", "gaussian"]
Activation = Literal["tanh", "relu"]

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}

# Smallest standard deviation of a Gaussian decoder: keeps log p(x | z) finite
# on pixels that are constant in the data (the border of the digits).
MIN_DECODER_SCALE = 1e-3
# Smallest standard deviation of q(z | x): keeps log q(z | x) finite.
MIN_ENCODER_SCALE = 1e-6


class NetworkShapeError(ValueError):
    """An encoder or decoder whose output has the wrong shape for the VAE it is part of."""


@dataclass(frozen=True)
class MLPConfig:
    """Architecture of a fully connected VAE; enough to rebuild it from a file."""

    x_dim: int
    z_dim: int
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    likelihood: str = "bernoulli"

    def __post_init__(self) -> None:
        check_positive_int(self.x_dim, "x_dim")
        check_positive_int(self.z_dim, "z_dim")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        for h in self.hidden:
            check_positive_int(h, "hidden")
        check_choice(self.activation, "activation", tuple(ACTIVATIONS))
        check_choice(self.likelihood, "likelihood", LIKELIHOODS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


@dataclass(frozen=True)
class ConvConfig:
    """Architecture of a convolutional VAE; enough to rebuild it from a file."""

    x_shape: tuple[int, int, int]
    z_dim: int
    channels: tuple[int, ...] = (32, 64)
    likelihood: str = "bernoulli"

    def __post_init__(self) -> None:
        object.__setattr__(self, "x_shape", tuple(self.x_shape))
        object.__setattr__(self, "channels", tuple(self.channels))
        if len(self.x_shape) != 3:
            raise ValueError(f"x_shape: expected (channels, height, width), got {self.x_shape}")
        for d in self.x_shape:
            check_positive_int(d, "x_shape")
        check_positive_int(self.z_dim, "z_dim")
        if not self.channels:
            raise ValueError("channels: expected at least one convolutional layer")
        for c in self.channels:
            check_positive_int(c, "channels")
        factor = 2 ** len(self.channels)
        if self.x_shape[1] % factor or self.x_shape[2] % factor:
            raise ValueError(
                f"x_shape: height and width must be divisible by {factor} (one halving per layer of "
                f"channels={self.channels}), got {self.x_shape[1:]}"
            )
        check_choice(self.likelihood, "likelihood", LIKELIHOODS)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "conv", **asdict(self), "x_shape": list(self.x_shape), "channels": list(self.channels)}


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _conv_networks(config: ConvConfig) -> tuple[nn.Sequential, nn.Sequential]:
    """Stride-2 convolutions down, a linear layer to the latent, and the mirror image up."""
    c, h, w = config.x_shape
    channels = [c, *config.channels]
    down: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(channels):
        down += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.ReLU()]
    factor = 2 ** len(config.channels)
    inner = (channels[-1], h // factor, w // factor)  # the smallest feature map
    encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(math.prod(inner), 2 * config.z_dim))
    out = c if config.likelihood == "bernoulli" else 2 * c
    up: list[nn.Module] = [nn.Linear(config.z_dim, math.prod(inner)), nn.ReLU(), nn.Unflatten(1, inner)]
    rev = list(reversed(channels))
    for i, (c_in, c_out) in enumerate(itertools.pairwise(rev)):
        last = i == len(rev) - 2
        up.append(nn.ConvTranspose2d(c_in, out if last else c_out, kernel_size=4, stride=2, padding=1))
        if not last:
            up.append(nn.ReLU())
    return encoder, nn.Sequential(*up)


class VAE(nn.Module):
    """A VAE built from any encoder and decoder networks.

    The networks see what they would in a plain training loop: the encoder a
    batch of data points, the decoder a batch of latent vectors (the ``k``
    importance samples of each data point folded into the batch, and unfolded
    again after).

    Parameters
    ----------
    encoder : nn.Module
        Maps ``x`` of shape ``(batch, *x_shape)`` to ``(batch, 2 * z_dim)``: the
        mean and the raw (pre-softplus) standard deviation of :math:`q_\\phi(z \\mid x)`.
    decoder : nn.Module
        Maps ``z`` of shape ``(N, z_dim)`` to ``(N, *x_shape)`` logits for a
        Bernoulli likelihood; for a Gaussian one, to the same shape with the
        first data dimension doubled, ``(N, 2 * x_shape[0], *x_shape[1:])``
        (means, then raw standard deviations; ``(N, 2 * x_dim)`` for flat data).
    x_shape : tuple of int, optional
        Shape of one data point, e.g. ``(1, 28, 28)``; give this or ``x_dim``.
    x_dim : int, optional
        Size of a flat data point, the same as ``x_shape=(x_dim,)``.
    z_dim : int
        Latent dimension.
    likelihood : {"bernoulli", "gaussian"}
        Family of :math:`p_\\theta(x \\mid z)`.

    Raises
    ------
    NetworkShapeError
        If a dry run on a batch of two (at construction) gives an output of the
        wrong shape; the message names the network and both shapes.

    Notes
    -----
    Standard deviations are parameterized as :math:`\\sigma = \\operatorname{softplus}(s) + \\sigma_{\\min}`
    of the network's raw output :math:`s`, with :math:`\\sigma_{\\min}` = ``MIN_ENCODER_SCALE``
    (1e-6) for :math:`q` and ``MIN_DECODER_SCALE`` (1e-3) for a Gaussian decoder.
    Use :meth:`VAE.mlp` or :meth:`VAE.conv` for ready networks; pass your own
    modules for anything else.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        x_shape: tuple[int, ...] | None = None,
        x_dim: int | None = None,
        z_dim: int,
        likelihood: Likelihood = "bernoulli",
    ) -> None:
        super().__init__()
        if (x_shape is None) == (x_dim is None):
            raise TypeError("x_shape: give exactly one of x_shape (e.g. (1, 28, 28)) and x_dim (flat data)")
        if x_shape is None:
            x_shape = (check_positive_int(x_dim, "x_dim"),)
        if isinstance(x_shape, int) or not all(isinstance(d, int) and d >= 1 for d in x_shape) or not x_shape:
            raise ValueError(f"x_shape: expected a tuple of positive integers, got {x_shape!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.x_shape: tuple[int, ...] = tuple(int(d) for d in x_shape)
        self.x_dim = math.prod(self.x_shape)
        self.z_dim = check_positive_int(z_dim, "z_dim")
        self.likelihood = check_choice(likelihood, "likelihood", LIKELIHOODS)
        self.config: MLPConfig | ConvConfig | None = None
        # A buffer, so the prior follows the model's device and dtype.
        self.register_buffer("_prior_loc", torch.zeros(z_dim))
        self._check_networks()

    @property
    def decoder_shape(self) -> tuple[int, ...]:
        """The decoder's output shape per latent vector."""
        if self.likelihood == "bernoulli":
            return self.x_shape
        return (2 * self.x_shape[0], *self.x_shape[1:])

    @torch.no_grad()
    def _check_networks(self) -> None:
        """A dry run on a batch of two, in eval mode: each network's output must have the expected shape."""
        p = next(itertools.chain(self.encoder.parameters(), self.decoder.parameters()), None)
        device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.get_default_dtype())
        was_training = self.training
        self.eval()
        try:
            for name, net, x, expected in (
                ("encoder", self.encoder, torch.zeros(2, *self.x_shape), (2, 2 * self.z_dim)),
                ("decoder", self.decoder, torch.zeros(2, self.z_dim), (2, *self.decoder_shape)),
            ):
                out = net(x.to(device, dtype))
                if not isinstance(out, Tensor) or tuple(out.shape) != expected:
                    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise NetworkShapeError(
                        f"{name}: for input of shape {tuple(x.shape)} expected output of shape {expected}, got {got}"
                        + (
                            " (a Gaussian decoder doubles the first data dimension)"
                            if name == "decoder" and self.likelihood == "gaussian"
                            else ""
                        )
                    )
        finally:
            self.train(was_training)

    @classmethod
    def mlp(
        cls,
        x_dim: int,
        z_dim: int,
        hidden: tuple[int, ...] = (200, 200),
        activation: Activation = "tanh",
        likelihood: Likelihood = "bernoulli",
    ) -> VAE:
        """Fully connected encoder and decoder with the same hidden sizes.

        ``VAE.mlp(784, 50, hidden=(200, 200))`` is the one-stochastic-layer
        architecture of Burda et al. (2015).
        """
        config = MLPConfig(x_dim, z_dim, tuple(hidden), activation, likelihood)
        out = x_dim if likelihood == "bernoulli" else 2 * x_dim
        encoder = _mlp([x_dim, *config.hidden, 2 * z_dim], activation)
        decoder = _mlp([z_dim, *reversed(config.hidden), out], activation)
        model = cls(encoder, decoder, x_dim=x_dim, z_dim=z_dim, likelihood=likelihood)
        model.config = config
        return model

    @classmethod
    def conv(
        cls,
        x_shape: tuple[int, int, int] = (1, 28, 28),
        z_dim: int = 16,
        channels: tuple[int, ...] = (32, 64),
        likelihood: Likelihood = "bernoulli",
    ) -> VAE:
        """A convolutional encoder and its transposed mirror as decoder, for images ``(C, H, W)``.

        Each entry of ``channels`` is a 4x4 convolution of stride 2 with a ReLU,
        halving the height and width (28 -> 14 -> 7, or 8 -> 4 -> 2); a linear
        layer maps the last feature map to the mean and raw scale of
        :math:`q(z \\mid x)`, and the decoder runs the same way back with
        transposed convolutions. ``VAE.conv((1, 8, 8), 8)`` fits the digits.

        References
        ----------
        Radford, Metz and Chintala (2016), "DCGAN", the all-convolutional stride-2 design.
        """
        config = ConvConfig(tuple(x_shape), z_dim, tuple(channels), likelihood)  # type: ignore[arg-type]
        encoder, decoder = _conv_networks(config)
        model = cls(encoder, decoder, x_shape=config.x_shape, z_dim=z_dim, likelihood=likelihood)
        model.config = config
        return model

    @classmethod
    def from_linear_gaussian(
        cls,
        toy: LinearGaussian,
        *,
        mean_factor: float = 1.0,
        scale_factor: float = 1.0,
    ) -> VAE:
        """A float64 VAE whose generative model is ``toy`` and whose encoder is its exact posterior.

        The decoder is one linear layer, ``z -> (W z + b, s)`` with a constant raw
        scale :math:`s = \\operatorname{softplus}^{-1}(\\sigma - \\sigma_{\\min})`,
        :math:`\\sigma_{\\min}` = ``MIN_DECODER_SCALE``, so that
        :math:`p_\\theta(x \\mid z) = \\mathcal{N}(W z + b, \\sigma^2 I)` exactly.
        The encoder is one linear layer holding the posterior's mean map and the
        raw form of its standard deviations (offset by ``MIN_ENCODER_SCALE``):

        .. math::

            q_\\phi(z \\mid x) = \\mathcal{N}\\big(a\\, \\Sigma W^\\top (x - b) / \\sigma^2,\\ c^2 \\Sigma\\big),
            \\qquad \\Sigma = (I + W^\\top W / \\sigma^2)^{-1},

        with ``a = mean_factor`` and ``c = scale_factor``. The defaults
        ``a = c = 1`` give :math:`q_\\phi(z \\mid x) = p_\\theta(z \\mid x)`, so every
        importance weight equals :math:`p_\\theta(x)` and the ELBO is tight; other
        values give a poorer encoder (a shrunk mean, a wider or narrower scale)
        whose ELBO ``toy.elbo(x, vae.encode(x))`` has a closed form.

        Parameters
        ----------
        toy : LinearGaussian
            The generative model :math:`x = W z + b + \\varepsilon`,
            :math:`\\varepsilon \\sim \\mathcal{N}(0, \\sigma^2 I)`.
        mean_factor : float
            Multiplies the posterior mean (finite).
        scale_factor : float
            Multiplies the posterior standard deviations (positive).

        Returns
        -------
        VAE
            Gaussian likelihood, ``x_dim = toy.x_dim``, ``z_dim = toy.z_dim``, float64.

        Raises
        ------
        ValueError
            If :math:`\\Sigma` is not diagonal: the encoder's Gaussian is diagonal, so
            only models with ``z_dim == 1`` or with orthogonal columns of ``W`` are
            supported. Also if :math:`\\sigma` is not above ``MIN_DECODER_SCALE`` or
            a scaled posterior standard deviation not above ``MIN_ENCODER_SCALE``.
        TypeError
            If ``toy`` is not a :class:`~vaelib.toy.LinearGaussian`.

        References
        ----------
        Bishop (2006), *Pattern Recognition and Machine Learning*, section 2.3.3 (the posterior);
        Tipping and Bishop (1999), probabilistic PCA.
        """
        if not isinstance(toy, LinearGaussian):
            raise TypeError(f"toy: expected a vaelib.LinearGaussian, got {type(toy).__name__}")
        for name, value in (("mean_factor", mean_factor), ("scale_factor", scale_factor)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        if scale_factor <= 0:
            raise ValueError(f"scale_factor: expected a positive number, got {scale_factor!r}")
        if toy.noise_std <= MIN_DECODER_SCALE:
            raise ValueError(f"toy: noise_std must exceed MIN_DECODER_SCALE = {MIN_DECODER_SCALE}, got {toy.noise_std}")
        W = toy.W.detach().to(torch.float64)  # (x_dim, z_dim)
        b = toy.b.detach().to(torch.float64)  # (x_dim,)
        x_dim, z_dim = W.shape
        var = toy.noise_std**2
        precision = torch.eye(z_dim, dtype=torch.float64) + W.T @ W / var  # (z_dim, z_dim)
        off_diagonal = precision - torch.diag(precision.diagonal())
        if bool(off_diagonal.abs().max() > 1e-12 * precision.diagonal().max()):
            raise ValueError(
                f"toy: the exact posterior covariance (I + W^T W / sigma^2)^-1 is not diagonal (z_dim = {z_dim} "
                "and W's columns are not orthogonal); a diagonal Gaussian encoder can hold it only when "
                "z_dim == 1 or W has orthogonal columns"
            )
        post_var = 1.0 / precision.diagonal()  # (z_dim,): the diagonal of Sigma
        q_scale = scale_factor * post_var.sqrt()  # (z_dim,)
        if bool((q_scale <= MIN_ENCODER_SCALE).any()):
            raise ValueError(
                f"scale_factor: the encoder's scales {q_scale.tolist()} must exceed "
                f"MIN_ENCODER_SCALE = {MIN_ENCODER_SCALE}"
            )
        gain = mean_factor * post_var[:, None] * W.T / var  # (z_dim, x_dim): q's mean is gain (x - b)

        def inverse_softplus(y: Tensor) -> Tensor:  # log(e^y - 1), stable for large y
            return y + torch.log(-torch.expm1(-y))

        encoder = nn.Linear(x_dim, 2 * z_dim, dtype=torch.float64)
        decoder = nn.Linear(z_dim, 2 * x_dim, dtype=torch.float64)
        with torch.no_grad():
            decoder.weight.zero_()
            decoder.weight[:x_dim] = W
            decoder.bias[:x_dim] = b
            decoder.bias[x_dim:] = inverse_softplus(
                torch.tensor(toy.noise_std - MIN_DECODER_SCALE, dtype=torch.float64)
            )
            encoder.weight.zero_()
            encoder.weight[:z_dim] = gain
            encoder.bias[:z_dim] = -(gain @ b)
            encoder.bias[z_dim:] = inverse_softplus(q_scale - MIN_ENCODER_SCALE)
        return cls(encoder, decoder, x_dim=x_dim, z_dim=z_dim, likelihood="gaussian")

    # -- the three distributions ----------------------------------------------------

    @property
    def prior(self) -> Independent[Any]:
        """:math:`p(z) = \\mathcal{N}(0, I)`, event shape ``(z_dim,)``."""
        loc: Tensor = self._prior_loc  # type: ignore[assignment]
        return Independent(Normal(loc, torch.ones_like(loc), validate_args=False), 1, validate_args=False)

    def encode(self, x: Tensor) -> Independent[Any]:
        """:math:`q_\\phi(z \\mid x)`, a diagonal Gaussian with batch shape ``x.shape[:-len(x_shape)]``.

        The scale is :math:`\\operatorname{softplus}(s) + 10^{-6}` of the encoder's raw output :math:`s`.
        """
        batch = x.shape[: x.dim() - len(self.x_shape)]
        h = self.encoder(x.reshape(-1, *self.x_shape))  # (N, 2 * z_dim)
        h = h.reshape(*batch, 2 * self.z_dim)  # (*batch, 2 * z_dim)
        loc, raw_scale = h.chunk(2, dim=-1)  # (*batch, z_dim) each
        scale = nn.functional.softplus(raw_scale) + MIN_ENCODER_SCALE
        return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)

    def decode(self, z: Tensor) -> Independent[Any]:
        """:math:`p_\\theta(x \\mid z)`, batch shape ``z.shape[:-1]``, event shape ``x_shape``.

        The decoder sees ``z`` flattened to ``(N, z_dim)``. The Bernoulli is built
        with ``validate_args=False`` so that grey values in [0, 1] score as a
        cross-entropy; binarize data for a true likelihood. A Gaussian's scale is
        :math:`\\operatorname{softplus}(s) + 10^{-3}` (``MIN_DECODER_SCALE``).
        """
        batch = z.shape[:-1]
        h = self.decoder(z.reshape(-1, self.z_dim))  # (N, *decoder_shape)
        h = h.reshape(*batch, *self.decoder_shape)  # (*batch, *decoder_shape)
        n_event = len(self.x_shape)
        if self.likelihood == "bernoulli":
            return Independent(Bernoulli(logits=h, validate_args=False), n_event, validate_args=False)
        loc, raw_scale = h.chunk(2, dim=-n_event)  # (*batch, *x_shape) each
        scale = nn.functional.softplus(raw_scale) + MIN_DECODER_SCALE
        return Independent(Normal(loc, scale, validate_args=False), n_event, validate_args=False)

    # -- bounds ---------------------------------------------------------------------

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """:math:`\\log p(z) + \\log p_\\theta(x \\mid z)`; ``z`` (k, batch, z_dim) gives (k, batch)."""
        out: Tensor = self.prior.log_prob(z) + self.decode(z).log_prob(x)
        return out

    def log_weights(self, x: Tensor, k: int = 1, *, seed: int | None = None) -> Tensor:
        """Log importance weights :math:`\\log p(x, z_i) - \\log q(z_i \\mid x)`, shape (k, batch).

        With ``seed``, the samples come from a generator seeded with it (see :func:`~vaelib.bounds.log_weights`).
        """
        return log_weights(x, self.encode(x), self.log_joint, k, seed=seed)

    def elbo(self, x: Tensor, k: int = 1, analytic_kl: bool = False) -> Tensor:
        """Monte Carlo ELBO averaged over ``k`` samples, shape (batch,).

        With ``analytic_kl=True`` the KL to the prior is computed in closed form
        (Kingma and Welling 2013, appendix B) and only the reconstruction term
        is sampled:

        .. math::

            \\mathcal{L}(x) \\approx \\frac{1}{k}\\sum_{i=1}^k \\log p_\\theta(x \\mid z_i)
            - \\mathrm{KL}\\big(q_\\phi(z \\mid x) \\,\\|\\, p(z)\\big).
        """
        check_positive_int(k, "k")
        self._check_dtype(x)
        if not analytic_kl:
            return elbo_from_log_weights(self.log_weights(x, k))
        q = self.encode(x)
        z = q.rsample((k,))  # (k, batch, z_dim)
        reconstruction = self.decode(z).log_prob(x).mean(dim=0)  # (batch,)
        return reconstruction - kl_divergence(q, self.prior)  # type: ignore[no-any-return]

    def iwae(self, x: Tensor, k: int = 5) -> Tensor:
        """Importance weighted bound with ``k`` samples, shape (batch,)."""
        check_positive_int(k, "k")
        self._check_dtype(x)
        return iwae_from_log_weights(self.log_weights(x, k))

    def _dtype(self) -> torch.dtype:
        """The dtype of the networks' parameters (of the prior's buffer for networks without any)."""
        fallback: torch.dtype = self._prior_loc.dtype  # type: ignore[assignment]
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), fallback)

    def _check_dtype(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        dtype = self._dtype()
        if x.dtype != dtype:
            raise TypeError(f"x: expected {dtype} data (the model's dtype), got {x.dtype}; convert with x.to({dtype})")

    # -- generation -----------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, *, mean: bool = True) -> Tensor:
        """Draw ``n`` images: ``z ~ p(z)``, then the decoder's mean (or a sample), ``(n, *x_shape)``."""
        check_positive_int(n, "n")
        z = self.prior.sample((n,))  # (n, z_dim)
        px = self.decode(z)
        return px.mean if mean else px.sample()

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoder mean at the encoder mean: :math:`\\mathbb{E}[x \\mid z = \\mu_\\phi(x)]`, ``(batch, *x_shape)``."""
        return self.decode(self.encode(x).mean).mean
