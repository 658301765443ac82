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
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence

from vaelib._checks import LIKELIHOODS, check_choice, check_positive_int
from vaelib.bounds import elbo_from_log_weights, iwae_from_log_weights, log_weights
from vaelib.networks import Activation, ConvConfig, MLPConfig, conv_networks, mlp_network

__all__ = ["VAE", "NetworkShapeError"]

Likelihood = Literal["bernoulli", "gaussian"]

# Smallest standard deviation of a Gaussian decoder: keeps log p(x | z) finite
# on pixels that are constant in the data (the border of the digits).
MIN_DECODER_SCALE = 1e-3
# Smallest standard deviation of q(z | x): keeps log q(z | x) finite.
MIN_ENCODER_SCALE = 1e-6


class NetworkShapeError(ValueError):
    """An encoder or decoder whose output has the wrong shape for the VAE it is part of."""


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
        encoder = mlp_network([x_dim, *config.hidden, 2 * z_dim], activation)
        decoder = mlp_network([z_dim, *reversed(config.hidden), out], activation)
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
        encoder, decoder = conv_networks(config)
        model = cls(encoder, decoder, x_shape=config.x_shape, z_dim=z_dim, likelihood=likelihood)
        model.config = config
        return model

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
